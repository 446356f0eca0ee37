"""Memory forecasts (distcomp/forecast.py) and how the worker claims by them."""

from __future__ import annotations

import time

import pytest

from distcomp.config import Config, WorkerConfig
from distcomp.forecast import (
    SHAPE_POINTS,
    SHAPE_TASKS,
    TRACE_POINTS,
    Outlook,
    Trace,
    profile,
    shape,
)
from distcomp.queue import Claim
from distcomp.runner import RunningTask
from distcomp.spec import parse_taskfile

MiB = 1 << 20
# A task of 4 s that grows evenly to its peak over the first 3 s, then holds it.
RAMP = tuple(min(1.0, (i + 1) / SHAPE_POINTS * 4 / 3) for i in range(SHAPE_POINTS))


def test_a_trace_keeps_a_bounded_record_of_the_whole_life_and_its_highs():
    trace = Trace([])
    for i in range(10_000):
        trace.add(i / 100, 1000 + i if i != 5_000 else 10**9)
    assert len(trace.points) < TRACE_POINTS
    ages = [a for a, _ in trace.points]
    assert ages == sorted(ages) and ages[0] == 0 and ages[-1] > 95
    assert max(r for _, r in trace.points) == 10**9  # a spike is merged in, not dropped


def test_a_shape_is_the_share_of_the_peak_held_over_the_life():
    trace = Trace([])
    for i in range(1, 41):  # every 0.1 s of a 4 s life: linear up to 300 MiB at 3 s
        trace.add(i / 10, min(300, 100 * i // 10) * MiB)
    got = shape(trace, 4.0, 300 * MiB)
    assert got is not None and len(got) == SHAPE_POINTS
    assert got[-4:] == (1.0,) * 4 and got[-5] < 1 and got[0] < 0.1  # at the peak from 3 s
    assert list(got) == sorted(got)
    gappy = Trace([(0.5, 50 * MiB), (3.9, 200 * MiB)])
    assert shape(gappy, 4.0, 200 * MiB) == (0.0, 0.0, 0.25, *(0.25,) * 12, 1.0)
    assert shape(Trace([]), 4.0, MiB) is None and shape(trace, 0.0, MiB) is None


def test_a_profile_needs_enough_tasks_and_expects_a_late_end():
    recs = [(life, RAMP) for life in (3.0, 4.0, 5.0)]
    assert profile(recs) is None
    half = tuple(s / 2 for s in RAMP)
    prof = profile([*recs, (8.0, half)])
    assert prof is not None and SHAPE_TASKS == 4
    assert prof.life == 8.0  # the 75th percentile of 3, 4, 5, 8
    assert prof.share == RAMP  # the most a task held at each point
    assert prof.reached == half  # the least a task had reached: one never showed its peak
    assert prof.point(0) == 0 and prof.point(100) == SHAPE_POINTS - 1


def test_a_running_task_is_scaled_by_its_own_size_once_it_shows_it():
    prof = profile([(4.0, RAMP)] * 4)
    assert prof is not None
    # Half way up at 1.5 s, 200 MiB held: heading for 400, whatever the class says.
    assert prof.peak_of(1.5, 200, 250) == pytest.approx(400)
    # Just started: too little of the shape shown, so the class's expected peak.
    assert prof.peak_of(0.1, 5, 250) == 250


def test_the_outlook_gives_back_what_ending_tasks_hold_and_fits_a_growing_task():
    prof = profile([(4.0, RAMP)] * 4)
    assert prof is not None
    # Near its end at 3.5 s and holding 400 MiB; the other task is unknown (charged 300 MiB).
    out = Outlook.of([(prof, 3.5, 400.0, 400.0, 400.0)], committed=300.0, growth=0.0)
    assert out.at == [0, 0.25, 0.5]  # its last sixteenth, then its end
    assert out.committed == [700, 700, 300]
    assert out.growth[-1] == -400  # gone by then: its memory comes back
    assert out.free(1000, 800) == 300  # now, both held
    # A new task of the class is tiny for the half second the old one has left.
    assert out.fit(prof, 1000, 800) == 700
    alone = Outlook.of([], committed=300.0, growth=50.0)
    assert alone.free(1000, 800) == alone.fit(prof, 1000, 800) == 700


def test_a_short_class_beside_a_long_one_is_forecast_over_its_whole_life():
    """Beside a task of a class that lives 1000 s, a task of one that lives 20 s still grows
    to its peak: the outlook follows each class at its own points, not at one step for all."""
    long = profile([(1000.0, (1.0,) * SHAPE_POINTS)] * SHAPE_TASKS)
    short = profile([(20.0, RAMP)] * SHAPE_TASKS)
    assert long is not None and short is not None
    # The long task holds 500 MiB; the short one is 1 s in, holding 30 of its expected 400.
    out = Outlook.of([(long, 10.0, 500.0, 500.0, 500.0), (short, 1.0, 30.0, 30.0, 400.0)],
                     committed=0.0, growth=0.0)
    assert max(out.committed) == pytest.approx(900)  # both at their peaks by 15 s
    assert out.free(1000, 1000) == pytest.approx(100)
    assert out.fit(long, 1000, 1000) == pytest.approx(100)
    assert out.at[-1] == pytest.approx(990) and out.committed[-1] == pytest.approx(0, abs=1e-6)


# Tasks of one class that peak at different times: some early, then hold a quarter of it;
# the others grow evenly to their peak at the end.
EARLY = (0.5, 1.0, 0.5, *(0.25,) * (SHAPE_POINTS - 3))
EVEN = tuple((i + 1) / SHAPE_POINTS for i in range(SHAPE_POINTS))


def test_a_class_whose_tasks_peak_at_different_times_is_forecast_by_its_latest():
    """A task of such a class that holds little early on may be one that grows to the end:
    it is charged the class's expected peak until the slowest of them would have shown a fair
    share of theirs, and forecast to hold its peak wherever one of them did."""
    prof = profile([(4.0, EARLY), (4.0, EVEN)] * 2)
    assert prof is not None
    assert prof.share == (0.5, 1.0, 0.5, *EVEN[3:])
    assert prof.peak_of(0.5, 100, 600) == 600  # an even one has shown an eighth by then
    out = Outlook.of([(prof, 0.5, 100.0, 100.0, 600.0)], committed=0.0, growth=0.0)
    assert max(out.committed) == pytest.approx(600)


def test_an_evenly_growing_task_is_not_taken_for_smaller_than_it_is():
    """A point of a shape holds the most of its sixteenth, reached at its end: a task inside a
    sixteenth holds less than that, and is measured by what the class had reached as far into
    it, so its peak is not forecast low (it was, by up to a quarter)."""
    prof = profile([(16.0, EVEN)] * SHAPE_TASKS)
    assert prof is not None
    for point in range(4, SHAPE_POINTS):  # a quarter shown: scaled by its own size
        for age in (point + 0.01, point + 0.5, point + 0.99):
            assert prof.peak_of(age, 800 * age / 16, 100) == pytest.approx(800)
    assert prof.peak_of(3.5, 800 * 3.5 / 16, 100) == 175  # a fifth shown: its own peak so far


def _running(claim: Claim, age: float, rss_mb: int) -> RunningTask:
    now = time.monotonic()
    task = RunningTask(claim=claim, pid=-1, pidfd=-1, started=time.time() - age,
                       started_mono=now - age, out_part="", err_part="")
    task.rss = task.peak_rss = rss_mb * MiB
    task.seen, task.samples = now, 10
    return task


def test_a_worker_claims_into_memory_that_a_forecast_task_will_give_back(queue, tmp_path):
    """A 400 MiB task of a learned class runs 3.5 s into its usual 4 s. Charged its peak, no
    other such task fits the 368 MiB left; by the forecast it is gone before a new one grows,
    so the real claim takes one, and a second does not fit the new one's growth."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), memory_limit=1 << 30,
                                          name="fw")), queue)
    w.register()
    parsed = parse_taskfile(b"shell:0:0:0:true a\nshell:0:0:0:true b\nshell:0:0:0:true c\n")
    queue.submit(parsed.tasks)
    assert {t.min_dram_gb for t in parsed.tasks} == {0.0}  # stored as "0.0", the class
    for _ in range(SHAPE_TASKS - 1):
        w.learn("0.0", 400 * MiB, 0.6, (4.0, RAMP))
    old = Claim("old", 1, "shell", "true", "", {}, 0, 0, 0.0, "0.0")
    w.running["old"] = _running(old, 3.5, 400)
    w.available = w.capacity - 400 * MiB
    out = w.outlook()
    free_mem = w.free(out)[0]
    assert free_mem == pytest.approx(368)
    assert w.claim_charges(out, free_mem) == {"0.0": 400.0}  # no profile yet: the peak
    assert queue.claim("fw", w.token, free_mem, 2, 8,
                       charges=w.claim_charges(out, free_mem)) == []
    w.learn("0.0", 400 * MiB, 0.6, (4.0, RAMP))
    assert "0.0" in w.profiles
    out = w.outlook()
    free_mem = w.free(out)[0]
    charged = w.claim_charges(out, free_mem)["0.0"]
    assert charged == pytest.approx(400 * free_mem / out.fit(w.profiles["0.0"], *w.rooms()))
    assert free_mem / 2 < charged <= free_mem
    got = queue.claim("fw", w.token, free_mem, 2, 8, charges=w.claim_charges(out, free_mem))
    assert got is not None and len(got) == 1


def test_an_empty_claim_is_tried_again_once_the_forecast_leaves_room(queue, tmp_path):
    """Nothing ends and nothing is submitted, yet a task of a learned class nearing its end
    makes room for a new one that will grow after it is gone: the worker's headroom grows with
    the running task's age although less memory is free, and the claim then gets a task."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), memory_limit=1 << 30,
                                          name="fr")), queue)
    w.register()
    queue.submit(parse_taskfile(b"shell:0:0:0:true a\nshell:0:0:0:true b\n").tasks)
    for _ in range(SHAPE_TASKS):
        w.learn("0.0", 400 * MiB, 0.6, (4.0, RAMP))

    def claim() -> tuple[list[Claim] | None, float]:
        out = w.outlook()
        free_mem = w.free(out)[0]
        return queue.claim("fr", w.token, free_mem, 2, 8,
                           charges=w.claim_charges(out, free_mem)), free_mem

    # 0.25 s into its 4 s it is charged its class's 400 MiB, and peaks when a new one would.
    task = w.running["old"] = _running(Claim("old", 1, "shell", "true", "", {}, 0, 0, 0.0,
                                             "0.0"), 0.25, 33)
    w.available = w.capacity - 33 * MiB
    got, free_young = claim()
    assert got == []
    w.claimed_nothing()
    assert not w.room_grew()
    # 3.45 s later it holds its peak, and is gone before a task started now has grown.
    task.started_mono -= 3.45
    task.rss = task.peak_rss = 400 * MiB
    w.available = w.capacity - 400 * MiB
    assert w.free()[0] <= free_young
    assert w.room_grew()
    assert not w.room_grew()  # once per empty claim
    got, _ = claim()
    assert got is not None and len(got) == 1


def test_after_an_empty_claim_memory_that_comes_back_is_claimed_at_once(queue, tmp_path):
    """A claim came back empty (a large task reserved here waits for room): a task's exit is
    measured again even when a typical task would fit, and a sample that finds more memory
    claims at once, not at the idle poll, with no forecast involved."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), memory_limit=1 << 30,
                                          name="fe")), queue)
    w.register()
    for _ in range(3):
        w.learn("0.25", 100 * MiB)  # a typical task: 100 MiB
    w.running["a"] = _running(Claim("a", 1, "shell", "true", "", {}, 0, 300, 0.0, "0.3"),
                              1.0, 300)
    w.running["b"] = _running(Claim("b", 1, "shell", "true", "", {}, 0, 300, 0.0, "0.3"),
                              1.0, 300)
    w.tasks_rss = 600 * MiB
    w.available = w.capacity - 600 * MiB
    w.claimed_nothing()
    assert not w.room_grew()
    del w.running["a"]  # it ended: the room it leaves is read again at once
    w.refresh_after_exit()
    assert w.tasks_rss == 300 * MiB
    assert w.room_grew()
    assert not w.room_grew()  # once per empty claim


def _ahead(w, gains, scale: float) -> float:
    """All the running tasks may gain before the next sample has acted (``Worker.ahead``)."""
    return sum(w.ahead(gains, scale).values())


def _ramp_learned(tmp_path, queue, name: str):
    """A 1 GiB worker that has seen enough undeclared tasks ramp to 400 MiB over 4 s to
    forecast the next ones."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), memory_limit=1 << 30,
                                          name=name)), queue)
    for _ in range(SHAPE_TASKS):
        w.learn("0.0", 400 * MiB, 0.6, (4.0, RAMP))
    return w


def test_eviction_projects_a_forecast_task_no_further_than_its_forecast_peak(tmp_path, queue):
    """Eviction looks one sample ahead: what each task gained over the last sample, scaled to
    the span until the next has acted. A task of a learned class stops growing at the peak its
    forecast expects, so it is projected no further; a task without a profile keeps its rate."""
    w = _ramp_learned(tmp_path, queue, "fa")
    # 2.5 s into its 4 s a task of the class holds 10/12 of its peak: 300 MiB heads for 360.
    known = _running(Claim("known", 1, "shell", "true", "", {}, 0, 0, 0.0, "0.0"), 2.5, 300)
    other = _running(Claim("other", 1, "shell", "true", "", {}, 0, 0, 0.0, "1.0"), 2.5, 300)
    top = 300 * 12 / 10
    assert _ahead(w, [(known, 20 * MiB)], 3.0) == pytest.approx((top - 300) * MiB)
    assert _ahead(w, [(known, 5 * MiB)], 3.0) == pytest.approx(15 * MiB)  # slower than that
    assert _ahead(w, [(known, 20 * MiB), (other, 20 * MiB)], 3.0) == \
        pytest.approx((top - 300 + 60) * MiB)


def test_eviction_projects_a_task_below_its_declaration_no_further_than_that(tmp_path, queue):
    """A node packed by declarations has little more than its reserve left once every task is
    at its peak; projecting a task's rate past the peak it declared set off evictions there
    (the benchmark's static-packing row, every true peak declared, evicted 1-2 tasks a run).
    A task already beyond its declaration keeps its rate: the declaration was wrong."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), memory_limit=1 << 30,
                                          name="fd")), queue)
    below = _running(Claim("below", 1, "shell", "true", "", {}, 0, 310, 0.0, "0.3"), 2.5, 300)
    beyond = _running(Claim("beyond", 1, "shell", "true", "", {}, 0, 290, 0.0, "0.3"), 2.5, 300)
    assert _ahead(w, [(below, 20 * MiB)], 3.0) == pytest.approx(10 * MiB)
    assert _ahead(w, [(below, 2 * MiB)], 3.0) == pytest.approx(6 * MiB)  # slower than that
    assert _ahead(w, [(beyond, 20 * MiB)], 3.0) == pytest.approx(60 * MiB)


def test_a_task_beyond_what_its_forecast_expects_keeps_its_rate(tmp_path, queue):
    """Early in its life a task of a learned class is expected to reach the class's peak; one
    already beyond it was projected not to grow at all (its forecast peak was its size), and
    the one task the forecast got wrong, still growing, was left to the kernel's OOM killer."""
    w = _ramp_learned(tmp_path, queue, "fb")
    young = _running(Claim("young", 1, "shell", "true", "", {}, 0, 0, 0.0, "0.0"), 0.3, 300)
    beyond = _running(Claim("beyond", 1, "shell", "true", "", {}, 0, 0, 0.0, "0.0"), 0.3, 500)
    assert _ahead(w, [(young, 50 * MiB)], 3.0) == pytest.approx(100 * MiB)  # up to 400
    assert _ahead(w, [(beyond, 50 * MiB)], 3.0) == pytest.approx(150 * MiB)


def test_a_task_below_its_classs_charge_is_projected_no_further_than_that(tmp_path, queue):
    """Undeclared tasks are admitted by the peak their class learned, not by their declaration
    of 0: projecting their rate past that peak evicted with memory to spare on a node packed by
    learned charges, the most common case."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), memory_limit=4 << 30,
                                          name="fc")), queue)
    w.learn("0.0", 400 * MiB)
    below = _running(Claim("below", 1, "shell", "true", "", {}, 0, 0, 0.0, "0.0"), 2.5, 390)
    beyond = _running(Claim("beyond", 1, "shell", "true", "", {}, 0, 0, 0.0, "0.0"), 2.5, 410)
    assert _ahead(w, [(below, 20 * MiB)], 3.0) == pytest.approx(10 * MiB)
    assert _ahead(w, [(beyond, 20 * MiB)], 3.0) == pytest.approx(60 * MiB)


def test_the_loop_does_not_sample_again_right_after_the_guard(tmp_path, queue):
    """The guard samples while the loop waits on Redis; the loop then sampled again at once,
    and what tasks gained in those milliseconds, scaled to a sample interval, was projected as
    a flood that evicted a task with memory to spare."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), memory_limit=1 << 30,
                                          name="gs")), queue)
    assert w.sample_due(time.monotonic())  # never sampled
    w.sample()  # the guard's
    assert not w.sample_due(time.monotonic())
    assert w.sample_due(w.last_sample + w.sample_every())


def test_an_evicted_tasks_projected_growth_goes_with_it(tmp_path, queue):
    """A young task growing fast leaves memory short one sample ahead; evicting it gives back
    what it holds and what it was about to take. Counting only what it held, an old task
    that was not growing (and had done the most work) was evicted with it."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), memory_limit=4 << 30,
                                          name="ev")), queue)
    old = _running(Claim("old", 1, "shell", "true", "", {}, 0, 0, 0.0, "0.0"), 30.0, 1500)
    young = _running(Claim("young", 1, "shell", "true", "", {}, 0, 0, 0.0, "0.0"), 1.0, 100)
    w.running = {"old": old, "young": young}
    shares = w.ahead([(old, 0), (young, 80 * MiB)], 2.0)
    assert shares == {"young": 160 * MiB}
    # 256 MiB of reserve, 160 MiB available now, 0 once the young task has grown
    assert w.victims(256 * MiB, shares) == [young]
    assert w.victims(400 * MiB, shares) == [young, old]  # short of more than it gives back
