"""Memory forecasts: what the running tasks of a class will hold over the rest of their life.

Charging every running task its expected peak from the moment it starts keeps a node safe, but
wastes the memory of tasks that have not grown yet, and of tasks that will be gone before a new
one grows. Tasks of one class (the same declared size: one sweep) tend to have the same shape
over time. So the worker records each task's memory over its life (a ``trace``), turns the ones
that ended on their own into shapes (share of the peak held at each sixteenth of the life), and
once a class has enough of them forecasts a running task of it from its age and what it holds:

* its own peak is what it holds scaled by how much of the class's peak a task of its age has
  usually reached (until that is a fair share, the class's expected peak);
* it holds that peak times the class's share at each later age, never less than it holds now;
* it is gone at the class's usual end (a late quantile of recent lives); a task older than that
  is charged its peak until it ends, as without a forecast.

The worker admits a new task of such a class when it fits at every instant of that forecast,
itself growing as its class does, so that tasks started together do not keep peaking together.
When the forecast is wrong, eviction still settles it, as it does for a wrong declaration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SHAPE_POINTS = 16  # points of a task's shape, evenly over its life
SHAPE_TASKS = 4  # shaped tasks of a class before it is forecast
TRACE_POINTS = 128  # samples kept of a running task; older ones are merged past that
LIFE_QUANTILE = 0.75  # where in the recent lives of a class its tasks are expected to end
TRUSTED_SHARE = 0.25  # share of the class's peak a task must reach before it is scaled by it
HORIZON_POINTS = 32  # instants a forecast is checked at, up to the last expected end


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
    """How tasks of a class use memory over their life, from their recent shapes."""

    life: float  # seconds by which most of them (``LIFE_QUANTILE``) have ended
    share: tuple[float, ...]  # mean share of the peak at each point of the life, max 1
    reached: tuple[float, ...]  # the largest share up to each point

    def point(self, age: float) -> int:
        return min(SHAPE_POINTS - 1, int(age / self.life * SHAPE_POINTS))

    def peak_of(self, age: float, peak_so_far: float, expected: float) -> float:
        """The peak a task of this class with ``peak_so_far`` at ``age`` is heading for."""
        reached = self.reached[self.point(age)]
        if reached < TRUSTED_SHARE:
            return max(expected, peak_so_far)
        return max(peak_so_far, peak_so_far / reached)


def profile(records: Iterable[tuple[float, Sequence[float]]]) -> Profile | None:
    """A class's profile from its recent (life, shape), or None with fewer than
    ``SHAPE_TASKS`` of them."""
    recs = list(records)
    if len(recs) < SHAPE_TASKS:
        return None
    lives = sorted(life for life, _ in recs)
    life = lives[min(len(lives) - 1, int(LIFE_QUANTILE * len(lives)))]
    mean = [sum(s[i] for _, s in recs) / len(recs) for i in range(SHAPE_POINTS)]
    top = max(mean)
    if life <= 0 or top <= 0:
        return None
    share = tuple(m / top for m in mean)
    reached, high = [], 0.0
    for s in share:
        high = max(high, s)
        reached.append(high)
    return Profile(life, share, tuple(reached))


@dataclass
class Outlook:
    """The running tasks' memory (MiB) at each of ``HORIZON_POINTS + 1`` instants ``step``
    seconds apart from now, up to the last expected end of a forecast task: what they will have
    committed and how much more than now they will hold."""

    committed: list[float]
    growth: list[float]
    step: float = 0.0

    @classmethod
    def of(cls, shaped: Sequence[tuple[Profile, float, float, float, float]],
           committed: float, growth: float) -> Outlook:
        """``shaped``: (profile, age, MiB held, peak MiB so far, expected peak MiB) of the
        forecast tasks; ``committed`` and ``growth``: the other tasks' constant share."""
        if not shaped:
            return cls([committed], [growth])
        n = HORIZON_POINTS + 1
        step = max(p.life - age for p, age, _, _, _ in shaped) / HORIZON_POINTS
        com, gro = [committed] * n, [growth] * n
        for prof, age, rss, peak, expected in shaped:
            top = prof.peak_of(age, peak, expected)
            for m in range(n):
                at = age + m * step
                if at >= prof.life:
                    gro[m] -= rss  # gone: what it holds now is given back
                    continue
                will = max(rss, top * prof.share[prof.point(at)])
                com[m] += will
                gro[m] += will - rss
        return cls(com, gro, step)

    def left(self, room: float, available: float) -> list[float]:
        """What is left at each instant of ``room`` for the tasks' commitments (capacity minus
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
        for m, r in enumerate(left):
            at = m * self.step
            if at >= prof.life:
                break
            share = prof.share[prof.point(at)]
            if share > 0:
                out = min(out, r / share)
        return out
