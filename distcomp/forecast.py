"""Memory forecasts: what the running tasks of a class will hold over the rest of their life.

Charging every running task its expected peak from the moment it starts keeps a node safe, but
wastes the memory of tasks that have not grown yet, and of tasks that will be gone before a new
one grows. Tasks of one class (the same declared size: one sweep) tend to have the same shape
over time. So the worker records each task's memory over its life (a ``trace``), turns the ones
that ended on their own into shapes (share of the peak held at each sixteenth of the life), and
once a class has enough of them forecasts a running task of it from its age and what it holds:

* its own peak is what it holds scaled by the least share of its peak a recent task of the
  class had reached by that age (until that is a fair share, the class's expected peak);
* it holds that peak times the most share of its peak a recent task held at each later age,
  never less than it holds now;
* it is gone at the class's usual end (a late quantile of recent lives); a task older than that
  is charged its peak until it ends, as without a forecast.

The worker admits a new task of such a class when it fits at every instant of that forecast,
itself growing as its class does, so that tasks started together do not keep peaking together.
When the forecast is wrong, eviction still settles it, as it does for a wrong declaration.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SHAPE_POINTS = 16  # points of a task's shape, evenly over its life
SHAPE_TASKS = 4  # shaped tasks of a class before it is forecast
TRACE_POINTS = 128  # samples kept of a running task; older ones are merged past that
LIFE_QUANTILE = 0.75  # where in the recent lives of a class its tasks are expected to end
TRUSTED_SHARE = 0.25  # share of the class's peak a task must reach before it is scaled by it


@dataclass
class Trace:
    """A task's memory over its life: (age s, bytes) at most every ``spacing`` seconds, the
    largest sample of each span, so a long task keeps a bounded, evenly spread record."""

    points: list[tuple[float, int]]
    spacing: float = 0.0

    def add(self, age: float, rss: int) -> None:
        pts = self.points
        if pts and age - pts[-1][0] < self.spacing:
            if rss > pts[-1][1]:
                pts[-1] = (pts[-1][0], rss)
            return
        pts.append((age, rss))
        if len(pts) >= TRACE_POINTS:
            self.points = [(a, max(r, pts[i + 1][1] if i + 1 < len(pts) else r))
                           for i, (a, r) in enumerate(pts) if i % 2 == 0]
            self.spacing = 2 * age / len(pts)


def shape(trace: Trace, life: float, peak: int) -> tuple[float, ...] | None:
    """The share of ``peak`` the task held in each ``SHAPE_POINTS``-th of its ``life`` (the
    largest sample in it; a span without a sample repeats the one before)."""
    if life <= 0 or peak <= 0 or not trace.points:
        return None
    held = [-1] * SHAPE_POINTS
    for age, rss in trace.points:
        i = min(SHAPE_POINTS - 1, int(age / life * SHAPE_POINTS))
        held[i] = max(held[i], rss)
    out, last = [], 0
    for h in held:
        last = h if h >= 0 else last
        out.append(min(1.0, last / peak))
    return tuple(out)


@dataclass(frozen=True)
class Profile:
    """How tasks of a class use memory over their life, from their recent shapes. A class is
    whatever tasks declared one size, so its tasks need not grow alike: it is described by the
    most any of them held at each point and the least any had reached, so that a task of it
    is forecast no smaller than the recent ones were."""

    life: float  # seconds by which most of them (``LIFE_QUANTILE``) have ended
    share: tuple[float, ...]  # the largest share of its peak one held at each point of the life
    reached: tuple[float, ...]  # the smallest share of its peak one had reached by each point

    def point(self, age: float) -> int:
        return min(SHAPE_POINTS - 1, int(age / self.life * SHAPE_POINTS))

    def peak_of(self, age: float, peak_so_far: float, expected: float) -> float:
        """The peak a task of this class with ``peak_so_far`` at ``age`` is heading for. A
        point of a shape holds the most of its span, which a growing task reaches at the span's
        end: a task inside a span is measured by the share reached between the span's start
        (the point before) and its end, as far into it as it is. It is trusted once the class
        had reached a fair share by the span's start."""
        point = self.point(age)
        start = self.reached[point - 1] if point else 0.0
        if start < TRUSTED_SHARE:
            return max(expected, peak_so_far)
        into = min(1.0, age / self.life * SHAPE_POINTS - point)
        return max(peak_so_far, peak_so_far / (start + (self.reached[point] - start) * into))

    def peaked(self) -> float:
        """The share of the life by which every recent task had reached the most it ever held."""
        return (self.reached.index(max(self.reached)) + 1) / SHAPE_POINTS


def _late(values: Iterable[float], early: bool = False) -> float:
    """The value ``LIFE_QUANTILE`` of the way up ``values``, or as far down them with
    ``early``."""
    ranked = sorted(values)
    i = min(len(ranked) - 1, int(LIFE_QUANTILE * len(ranked)))
    return ranked[len(ranked) - 1 - i if early else i]


def profile(records: Iterable[tuple[float, Sequence[float]]]) -> Profile | None:
    """A class's profile from its recent (life, shape), or None with fewer than
    ``SHAPE_TASKS`` of them. Each point is taken as late in the recent tasks as their life:
    a class's tasks need not grow alike, and the few that did not grow like most of them are
    left to eviction."""
    recs = list(records)
    if len(recs) < SHAPE_TASKS:
        return None
    life = _late(life for life, _ in recs)
    if life <= 0 or not any(max(s) > 0 for _, s in recs):
        return None
    share = tuple(_late(s[i] for _, s in recs) for i in range(SHAPE_POINTS))
    reached = tuple(_late((max(s[:i + 1]) for _, s in recs), early=True)
                    for i in range(SHAPE_POINTS))
    return Profile(life, share, reached)


@dataclass
class Outlook:
    """The running tasks' memory (MiB) from now on: from ``at[i]`` seconds from now until
    ``at[i + 1]`` (the last for good), what they will have committed and how much more than
    now they will hold. A forecast holds one share over each sixteenth of a task's life and
    ends at the class's usual end, so these instants, where any of that changes, are all the
    instants that matter, for a class that lives seconds beside one that lives hours alike."""

    at: list[float]
    committed: list[float]
    growth: list[float]

    @classmethod
    def of(cls, shaped: Sequence[tuple[Profile, float, float, float, float]],
           committed: float, growth: float) -> Outlook:
        """``shaped``: (profile, age, MiB held, peak MiB so far, expected peak MiB) of the
        forecast tasks; ``committed`` and ``growth``: the other tasks' constant share."""
        changes: dict[float, float] = {}
        for prof, age, rss, peak, expected in shaped:
            top = prof.peak_of(age, peak, expected)
            first = prof.point(age)
            held = max(rss, top * prof.share[first])
            committed += held
            growth += held - rss
            for point in range(first + 1, SHAPE_POINTS):
                will = max(rss, top * prof.share[point])
                at = max(0.0, point * prof.life / SHAPE_POINTS - age)
                changes[at] = changes.get(at, 0.0) + will - held
                held = will
            # Gone: what it holds now is given back, and so is what it would have grown by.
            end = max(0.0, prof.life - age)
            changes[end] = changes.get(end, 0.0) - held
        at, com, gro = [0.0], [committed], [growth]
        for when in sorted(changes):
            at.append(when)
            com.append(com[-1] + changes[when])
            gro.append(gro[-1] + changes[when])
        return cls(at, com, gro)

    @property
    def varies(self) -> bool:
        """Whether a forecast task's memory changes from now on."""
        return len(self.at) > 1

    def left(self, room: float, available: float) -> list[float]:
        """What is left from each instant of ``room`` for the tasks' commitments (capacity minus
        reserve) and of ``available`` memory above the reserve now."""
        return [min(room - c, available - g) for c, g in zip(self.committed, self.growth)]

    def free(self, room: float, available: float) -> float:
        """Memory a new task can be charged from now on and still fit at every instant."""
        return min(self.left(room, available))

    def fit(self, prof: Profile, room: float, available: float) -> float:
        """The largest peak a new task of the class ``prof`` describes can have and fit at
        every instant, growing as its class does: a task started now is still small when the
        running ones peak. After the last forecast end it is held at its peak."""
        left = self.left(room, available)
        out = left[-1]
        for point, share in enumerate(prof.share):
            if share <= 0:
                continue
            start = bisect_right(self.at, point * prof.life / SHAPE_POINTS) - 1
            end = bisect_left(self.at, (point + 1) * prof.life / SHAPE_POINTS)
            out = min(out, min(left[start:end]) / share)
        return out
