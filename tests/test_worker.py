"""The worker daemon end to end: real worker processes, real tasks, real memory pressure."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import redis

from distcomp.config import Config, WorkerConfig
from distcomp.queue import Claim, Queue
from distcomp.redis_client import Redis
from tests.conftest import HELPERS, WorkerProcess
from tests.helpers import wait_for

GROW = HELPERS / "grow.py"
CREEP = HELPERS / "creep.py"


def submit(queue, lines: list[str]) -> list[str]:
    from distcomp.spec import parse_taskfile

    parsed = parse_taskfile("\n".join(lines).encode())
    assert not parsed.errors, parsed.errors
    queue.submit(parsed.tasks)
    return [t.task_id for t in parsed.tasks]


def drained(queue) -> bool:
    c = queue.counts()
    return c["todo"] == 0 and c["running"] == 0


def state(queue, tid: str) -> str | None:
    return (queue.task(tid) or {}).get("state")


def test_runs_tasks_and_records_results(queue, workers):
    ids = submit(queue, [
        "shell:0:0:1:echo out-$((6*7)); echo err >&2",
        'python:0:0:1:-c "import sys; sys.stdout.buffer.write(bytes([0xff, 0xfe]))"',
        "shell:0:0:1:exit 7",
    ])
    w = workers("w1", "--cores", "4")
    wait_for(lambda: drained(queue), 60, "the queue to drain")
    ok, binary, bad = (queue.task(i) for i in ids)
    assert ok["state"] == "finished" and ok["exit_code"] == "0" and ok["worker"] == "w1"
    assert ok["stdout_tail"] == "out-42\n" and ok["stderr_tail"] == "err\n"
    # An echo is over before the first memory sample and uses less than the worker, whose own
    # peak its ru_maxrss would report (tests/test_runner.py): nothing measurable is 0.
    assert float(ok["wall_s"]) >= 0 and int(ok["peak_mem"]) < 8 << 20
    out = workers.results / ids[0][:2] / f"{ids[0]}.out"
    assert out.read_text() == "out-42\n"
    assert binary["state"] == "finished" and binary["stdout_tail"] == "\ufffd\ufffd"
    assert bad["state"] == "failed" and bad["exit_code"] == "7"
    assert bad["reason"] == "exit code 7" and bad["attempt"] == "4"  # 1 + 3 retries
    assert w.proc.poll() is None, "the worker survives its tasks"


def test_tasks_start_with_default_signals_no_worker_descriptors_and_their_directory(
        queue, workers, tmp_path):
    """Tasks are spawned with posix_spawn, not Popen: SIGPIPE must be back to its default, no
    descriptor of the worker (not even one it inherited) may reach a task, and each task runs
    in the directory it asked for."""
    held = os.open(tmp_path / "held-by-the-worker", os.O_CREAT | os.O_RDWR)
    os.set_inheritable(held, True)
    own_dir = tmp_path / "own dir"
    own_dir.mkdir()
    fds = "import os; print(' '.join(sorted(os.listdir('/proc/self/fd'), key=int)))"
    ids = submit(queue, [
        'shell:0:0:1:yes | head -c 1 >/dev/null; echo "${PIPESTATUS[0]}"',
        f'python:0:0:1:-c "{fds}"',
        "shell:0:0:1:pwd",
        json.dumps({"type": "shell", "params": "pwd", "cwd": str(own_dir)}),
        json.dumps({"type": "shell", "params": "pwd", "cwd": str(tmp_path / "gone"),
                    "max_retries": 0}),
    ])
    try:
        workers("w1", "--cores", "4", pass_fds=(held,))
    finally:
        os.close(held)
    wait_for(lambda: drained(queue), 60, "the queue to drain")
    pipe, fd_list, default_dir, asked_dir, missing = (queue.task(i) for i in ids)
    assert pipe["stdout_tail"] == "141\n"  # yes was killed by SIGPIPE (128 + 13)
    # stdin, stdout, stderr and the one listdir opened: no inherited file, no Redis socket.
    assert fd_list["stdout_tail"] == "0 1 2 3\n", fd_list
    assert default_dir["stdout_tail"] == f"{tmp_path}\n"  # the results dir's parent
    assert asked_dir["stdout_tail"] == f"{own_dir}\n"
    assert (missing["state"], missing["reason"]) == (
        "failed", f"cannot start: No such file or directory: {tmp_path / 'gone'}")


def test_an_attempt_put_back_in_the_queue_leaves_no_output_files(queue, workers):
    """Only the recorded attempt's output may become ID.out. A failed attempt that goes back to
    the queue is not the outcome, and renaming its files after the reply could overwrite the
    files of the next attempt, run and recorded meanwhile by another worker (the fault suite
    saw it). A second live worker that never claims makes the retry wait, so the first
    attempt's files can be looked for."""
    queue.register("elsewhere", "tok-elsewhere", 120_000, {"room_mb": 1 << 20, "cores": 64})
    (tid,) = submit(queue, [json.dumps({"type": "shell", "params": "echo first; exit 3",
                                        "max_retries": 1})])
    w = workers("w1")
    wait_for(lambda: f"task {tid} requeued: exit code 3" in w.output(), 30,
             "the failed attempt to be requeued")
    t = queue.task(tid)
    assert (t["state"], t["attempt"], t["stdout_tail"]) == ("todo", "1", "first\n")
    assert not list(workers.results.glob(f"*/{tid}*")), "the requeued attempt left files"


def test_timeout_kills_and_fails_with_reason(queue, workers):
    (tid,) = submit(queue, ['{"type": "shell", "params": "sleep 60", "timeout_s": 0.5}'])
    workers("w1")
    wait_for(lambda: state(queue, tid) == "failed", 30, "the timeout")
    task = queue.task(tid)
    assert task["reason"] == "timed out after 0.5s (killed)"
    assert task["attempt"] == "1"


def test_task_tree_is_killed_and_term_ignoring_tasks_die(queue, workers, tmp_path):
    pidfile = tmp_path / "child.pid"
    (tid,) = submit(queue, [
        '{"type": "shell", "timeout_s": 1, "params": '
        + json.dumps(f"trap '' TERM; (trap '' TERM; sleep 300) & echo $! > {pidfile}; sleep 300")
        + "}"])
    workers("w1", "--kill-grace", "0.5")
    wait_for(lambda: state(queue, tid) == "failed", 30, "the timeout")
    child = int(pidfile.read_text())
    wait_for(lambda: _ended(child), 10, "the forked child to be killed")


def test_retry_moves_to_another_worker(queue, workers, tmp_path):
    marker = tmp_path / "first-worker"
    script = (f'if [ -e {marker} ]; then [ "$(cat {marker})" != "$DISTCOMP_WORKER" ]; '
              f'else echo $DISTCOMP_WORKER > {marker}; exit 1; fi')
    workers("w1")
    workers("w2")
    (tid,) = submit(queue, [f"shell:0:0:1:{script}"])
    wait_for(lambda: drained(queue), 60, "the queue to drain")
    task = queue.task(tid)
    assert task["state"] == "finished", task
    assert task["attempt"] == "2" and task["worker"] != marker.read_text().strip()


def test_eviction_kills_the_youngest_task_and_requeues_it(queue, workers):
    # Three tasks declare no memory but each grows to 250 MB: on a 600 MB worker the last
    # one started must be evicted and come back, and all must finish without an OOM kill.
    lines = [f"python:{p}:0:1:{GROW} 250 0.02 1.5" for p in (3, 2, 1)]
    old, middle, young = submit(queue, lines)
    w = workers("w1", "--cores", "4", "--memory-limit", "600M", "--memory-reserve", "100M",
                "--evict-below", "60M")
    wait_for(lambda: drained(queue), 180, "the queue to drain")
    tasks = {name: queue.task(tid) for name, tid in
             (("old", old), ("middle", middle), ("young", young))}
    assert all(t["state"] == "finished" for t in tasks.values()), (tasks, w.output())
    assert int(tasks["young"].get("evictions", 0)) >= 1, (tasks, w.output())
    assert "evictions" not in tasks["old"]
    assert int(tasks["young"]["req_mem"]) > 0, "requeued with its observed peak, not 0"
    assert int(tasks["old"]["peak_mem"]) >= 250 << 20


def test_the_log_gives_the_reason_the_queue_recorded(queue, workers, client):
    """A task evicted past its eviction budget fails with the budget's reason, which only the
    queue writes: the worker's log said "failed: " and nothing more. Redis forgets its scripts
    first, as after a restart: a read pipelined behind the report came back from before it."""
    lines = [f"python:{p}:0:1:{GROW} 250 0.02 1.5" for p in (3, 2, 1)]
    *_, young = submit(queue, lines)
    w = workers("w1", "--cores", "4", "--memory-limit", "600M", "--memory-reserve", "100M",
                "--evict-below", "60M", "--eviction-budget", "0")
    client.script_flush()
    wait_for(lambda: drained(queue), 180, "the queue to drain")
    task = queue.task(young)
    assert task["state"] == "failed" and task["reason"].startswith("evicted 1 times"), task
    assert f"task {young} failed: {task['reason']}\n" in w.output()


def test_an_eviction_holds_new_tasks_while_the_rest_still_outgrow_their_charge(queue, workers):
    """Six tasks that declare nothing start at once on a node with 768 MiB for tasks and each
    grow to 300 MB. The youngest are evicted; had the worker claimed the memory they gave back
    at once, the ones left, still growing, would evict them again and again (up to their
    eviction budget). It waits for a task to end instead: nothing is evicted twice."""
    ids = submit(queue, [f"python:0:0:1:{GROW} 300 0.05 0.5 t{i}" for i in range(6)])
    w = workers("w1", "--cores", "6", "--memory-limit", "1G")
    wait_for(lambda: drained(queue), 180, "the queue to drain")
    tasks = [queue.task(i) for i in ids]
    assert {t["state"] for t in tasks} == {"finished"}, w.output()
    evictions = [int(t.get("evictions", 0)) for t in tasks]
    assert sum(evictions) >= 1, w.output()
    assert max(evictions) == 1, (evictions, w.output())
    assert "taking no new tasks until one ends or they stop growing" in w.output()


def test_a_hold_lasts_only_while_the_tasks_would_soon_fill_the_free_memory(queue, tmp_path):
    """Tasks of hours that grow slowly must not keep a node from taking work for hours after
    one eviction: a hold counts them as growing only while, at their rate, they would fill
    the free memory within GROWTH_HORIZON_S."""
    from distcomp.worker import GROWTH_HORIZON_S, Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="gh")), queue)
    w.growth_rate = 40 << 20  # 40 MiB/s
    assert w.growing_into(40 * GROWTH_HORIZON_S * (1 << 20) - 1)
    assert not w.growing_into(40 * GROWTH_HORIZON_S * (1 << 20) + 1)
    w.growth_rate = 0.0
    assert not w.growing_into(0)
    w.growth_rate = 1.0
    assert w.growing_into(-1)  # below the reserve, any growth is into the memory left


def test_a_hold_ends_while_a_long_task_still_grows_slowly(queue, workers, tmp_path):
    """The hold, end to end. A long task keeps growing slowly (5 MB/s) and ends only once a
    file appears that a later task writes; a big task beside it is evicted, which holds
    claims. Had the hold waited for the slow task to stop growing or to end, the later task
    would not start before the slow one's cap (120 s) and the queue would not drain in time."""
    written, big_ran = tmp_path / "written", tmp_path / "big-ran"
    ids = submit(queue, [
        f"python:3:0:1:{CREEP} 100 5 {written} 120",
        (f"shell:2:0:1:[ -e {big_ran} ] || {{ touch {big_ran}; exec {sys.executable} {GROW} "
         f"800 0.02 60; }}"),
        f"shell:1:0:1:touch {written}",
    ])
    w = workers("w1", "--cores", "2", "--memory-limit", "1G")
    wait_for(lambda: drained(queue), 110, "the queue to drain")
    slow, big, later = (queue.task(i) for i in ids)
    assert [t["state"] for t in (slow, big, later)] == ["finished"] * 3, w.output()
    assert (big.get("evictions"), slow.get("evictions", "0")) == ("1", "0"), w.output()
    out = w.output()
    assert out.index("taking no new tasks until one ends or they stop growing") < \
        out.index("taking new tasks again"), out


def test_what_a_task_holds_at_its_first_sample_is_not_growth_to_project(queue, tmp_path):
    """Eviction projects each task's growth since the last sample. A task's first sample holds
    its program's start-up (a Python task: 25 MB in 50 ms); projected at that rate, tasks that
    started together were evicted at once with memory to spare, and again when they came
    back. A real task: its start-up is no growth, what it adds after that is."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="su")), queue)
    w.sample()  # the loop's sample before the task starts
    w.start([Claim("su", 1, "python", f"{GROW} 200 0.5 30", "", {}, 0, 0, 1.0, "0")])
    task = w.running["su"]
    try:
        proc = psutil.Process(task.pid)
        wait_for(lambda: proc.memory_info().rss >= 30 << 20, 30, "the task to hold 30 MB")
        w.sample()
        assert task.rss >= 30 << 20 and w.growth_rate == 0
        wait_for(lambda: proc.memory_info().rss >= task.rss + (10 << 20), 30,
                 "the task to grow by 10 MB")
        w.sample()
        assert w.growth_rate > 0
    finally:
        os.killpg(task.pid, signal.SIGKILL)
        os.waitpid(task.pid, 0)


def test_memory_a_swept_session_holds_is_not_a_shortage_the_running_tasks_pay_for(queue,
                                                                                  tmp_path):
    """What an ended task left in its session is killed by the next sample, which then measured
    available memory before the kernel had it back: running tasks were evicted for memory on
    its way back (a swept 400 MiB process evicted two tasks holding nothing). The sample that
    sweeps waits for the next, as it does for victims that have not exited."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="sw", cores=2)), queue)
    w.start([Claim(tid, 1, "shell", "sleep 60", "", {}, 0, 0, 0.0, "0") for tid in ("a", "b")])
    hold = "b = bytearray(20 << 20); b[::4096] = b'x' * len(b[::4096]); print(flush=True); input()"
    left = subprocess.Popen([sys.executable, "-c", hold],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        left.stdout.readline()  # it holds its 20 MiB
        w.sweep_sids.add(left.pid)  # as if a task that ended had begun that session
        w.evict_below = w.reserve = w.capacity  # memory short whatever the node has
        w.sample()
        assert left.wait(10) == -signal.SIGKILL
        assert not w.evicting
        w.sample()
        assert w.evicting == {"a", "b"}
    finally:
        left.kill()
        left.communicate()
        for task in w.running.values():
            os.killpg(task.pid, signal.SIGKILL)
            os.waitpid(task.pid, 0)


def test_victims_in_their_grace_period_are_killed_when_memory_runs_out(queue, tmp_path):
    """An evicted task gets TERM and a grace period to save its work; meanwhile the worker
    only waited, whatever memory did: a victim that ignores TERM held its memory for the whole
    grace while available memory fell to nothing, left to the kernel's OOM killer. Below half
    the eviction threshold the victims get KILL at once."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="gr", cores=2,
                                          kill_grace=300)), queue)
    w.start([Claim(tid, 1, "shell", "trap '' TERM; sleep 300 & wait; sleep 300", "", {}, 0, 0,
                   0.0, "0") for tid in ("a", "b")])
    try:
        w.evict_below = w.reserve = w.capacity  # short, but not critically
        w.sample()
        assert w.evicting == {"a", "b"}
        w.sample()
        assert not any(w.runner.exited(t) for t in w.running.values())
        w.evict_below = w.reserve = 4 * w.capacity  # critically short
        w.sample()
        for task in w.running.values():
            wait_for(lambda task=task: w.runner.exited(task), 30, f"task {task.task_id} to die")
    finally:
        for task in w.running.values():
            with contextlib.suppress(OSError):
                os.killpg(task.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(task.pid, 0)


@pytest.mark.parametrize("kill", ["evict", "timeout", "cancel", "shutdown"])
def test_a_task_that_ended_before_a_kill_reached_it_is_recorded_as_finished(
        queue, tmp_path, kill):
    """Kills are decided on what the worker saw last: an eviction on the last sample, a timeout
    on the clock, a cancel on the heartbeat, a stop on a signal. A task whose process ended
    since then did its work; killing it anyway labelled it evicted or requeued it on the stop
    (and ran it again), or failed it as timed out or cancelled."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="late", cores=2,
                                          default_timeout=60)), queue)
    w.register()
    [tid] = submit(queue, ["shell:0:0:1:echo did it"])
    assert w.exchange(True) == 1
    task = w.running[tid]
    os.waitid(os.P_PID, task.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped yet
    if kill == "evict":
        # memory short whatever the node has, by more than the task holds: it would be picked
        w.evict_below = w.reserve = w.capacity
        w.sample()
    elif kill == "timeout":
        w.check_deadlines(task.started_mono + 61)
    elif kill == "cancel":
        assert queue.cancel([tid]) == (0, 1)  # flagged for its worker
        w.heartbeat()
    else:
        w.requeue_all()
        assert state(queue, tid) == "running"
    assert task.kill_reason is None
    assert w.runner.try_reap(task)
    w.completed(task)
    w.exchange(False)
    record = queue.task(tid)
    assert (record["state"], record.get("evictions", "0")) == ("finished", "0"), record
    with open(w.runner.final_paths(tid)[0]) as out:
        assert out.read() == "did it\n"


def test_a_task_whose_exit_status_is_lost_fails_saying_so(queue, tmp_path):
    """A task's process reaped by someone else (the kernel, while SIGCHLD is ignored) leaves
    no exit status to report: it was taken for exit code 0 and the task recorded finished."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="lost-status")),
               queue)
    w.register()
    gate = tmp_path / "gate"
    (tid,) = submit(queue, [json.dumps({
        "type": "shell", "params": f"while [ ! -e {gate} ]; do sleep 0.01; done; exit 3",
        "max_retries": 0})])
    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        assert w.exchange(True) == 1
        task = w.running[tid]
        gate.touch()
        select.select([task.pidfd], [], [])  # the task has exited, and the kernel reaped it
        assert w.runner.try_reap(task)
    finally:
        signal.signal(signal.SIGCHLD, before)
    w.completed(task)
    w.exchange(False)
    record = queue.task(tid)
    assert (record["state"], record["exit_code"], record["reason"]) == (
        "failed", "", "exit status lost: the task's process was reaped outside the worker")


def test_a_tasks_life_is_measured_on_the_clock_of_its_memory_trace(queue, tmp_path):
    """A task's shape spreads its memory samples, aged on the monotonic clock, over its life:
    measured on the wall clock, a step of the clock while it ran (NTP) stretched or squeezed
    its life and put its samples in the wrong part of it, and its recorded wall time too."""
    from distcomp.worker import FILL_SAMPLES, Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="life")), queue)
    w.register()
    gate = tmp_path / "gate"
    (tid,) = submit(queue, [f"shell:0:0:1:while [ ! -e {gate} ]; do sleep 0.01; done"])
    assert w.exchange(True) == 1
    task = w.running[tid]
    # Samples count a task's session: under load they could all come before the child's setsid.
    wait_for(lambda: os.getsid(task.pid) == task.pid, 30, "the task's own session")
    for _ in range(FILL_SAMPLES):
        w.sample()
    gate.touch()
    select.select([task.pidfd], [], [])
    assert w.runner.try_reap(task)
    task.started -= 3600  # the wall clock was stepped an hour ahead while it ran
    w.completed(task)
    ((_, _, (life, _)),) = w.classes[task.claim.declared]
    assert 0 < life < 60, life
    # So is the wall time it is recorded with, which took the hour in.
    assert 0 < float(w.result(task)["wall_s"]) < 60


def test_a_task_whose_output_cannot_be_set_up_fails_and_the_worker_goes_on(queue, workers):
    """A results shard that cannot be made (a file in its place here; on MooseFS an EIO,
    ESTALE or ENOSPC takes the same path) fails that task as one that cannot start, and its
    output files cannot be removed or renamed either: the worker logs it, records each
    attempt once and runs the other tasks. It used to die of the first error."""
    blocked, fine = submit(queue, [
        json.dumps({"type": "shell", "params": "echo blocked", "max_retries": 1}),
        "shell:0:0:1:echo fine"])
    assert blocked[:2] != fine[:2]
    shard = workers.results / blocked[:2]
    workers.results.mkdir()
    shard.touch()
    w = workers("w1")
    wait_for(lambda: drained(queue) or w.proc.poll() is not None, 30, "the queue to drain")
    assert w.proc.poll() is None, w.output()
    task = queue.task(blocked)
    assert (task["state"], task["attempt"], task["reason"]) == (
        "failed", "2", f"cannot start: File exists: {shard}")
    assert state(queue, fine) == "finished"
    assert f"task {blocked}: cannot remove the output of attempt 1" in w.output()
    assert f"task {blocked}: cannot rename the output of attempt 2" in w.output()


def test_a_task_too_big_for_its_node_moves_to_a_larger_one(queue, workers, client):
    """Workers differ in size. A task that declares nothing and outgrows the small node while
    running alone there cannot ever fit it, but the large node has room: it must run there,
    not fail. The large worker starts only once the small one runs the task."""
    (tid,) = submit(queue, [f"python:0:0:1:{GROW} 500 0.01 0.2"])
    small = workers("small", "--memory-limit", "300M", "--memory-reserve", "60M",
                    "--evict-below", "40M")
    wait_for(lambda: client.hget(queue.key("t", tid), "pstart"), 30, "the task to start")
    workers("large", "--memory-limit", "2G")
    wait_for(lambda: state(queue, tid) in ("finished", "failed"), 60, "the task to end")
    task = queue.task(tid)
    assert (task["state"], task["worker"], task.get("evictions")) == ("finished", "large", "1"), \
        (task, small.output())
    assert int(task["req_mem"]) > 240, "requeued needing more than the small node has room for"


def test_task_too_big_for_the_node_fails_with_reason(queue, workers):
    (tid,) = submit(queue, [f"python:0:0:1:{GROW} 500 0.01 5"])
    workers("w1", "--memory-limit", "300M", "--memory-reserve", "60M", "--evict-below", "40M")
    wait_for(lambda: state(queue, tid) == "failed", 60, "the task to fail")
    reason = queue.task(tid)["reason"]
    assert reason.startswith("needs more memory than node w1 has: peak ")
    assert reason.endswith("node capacity 300 MiB (reserve 60 MiB); no live worker has room "
                           "for more (largest: 240 MiB)"), reason


def test_kill_9_worker_lease_expires_and_another_worker_finishes(queue, workers, tmp_path):
    """The dead worker's task is requeued by whoever sees its lease expired first (here a
    `distcomp status`); w2, on the same host under another name, kills what the task left
    running and runs it again."""
    marker = tmp_path / "ran-once"
    (tid,) = submit(queue, [(f"shell:0:0:1:if [ -e {marker} ]; then echo again; "
                            f"else touch {marker}; sleep 300; fi")])
    w1 = workers("w1", "--heartbeat-ttl", "1")
    wait_for(lambda: marker.exists() and queue.task(tid).get("pid"), 30, "the task to start")
    orphan = psutil.Process(int(queue.task(tid)["pid"]))
    left = [orphan, *orphan.children(recursive=True)]
    w1.signal(signal.SIGKILL)
    w1.wait()
    wait_for(lambda: queue.reap().requeued == 1, 30, "w1's lease to expire")
    assert all(p.is_running() for p in left)
    w2 = workers("w2", "--heartbeat-ttl", "1")
    wait_for(lambda: state(queue, tid) == "finished", 60, "the task to finish on w2")
    task = queue.task(tid)
    assert task["worker"] == "w2" and task["attempt"] == "2"
    assert task["stdout_tail"] == "again\n"
    assert not [p.pid for p in left if not _ended(p.pid)]
    assert f"killed {len(left)} orphan process(es) of task {tid}" in w2.output()


def test_restarted_worker_kills_its_orphans_and_requeues(queue, workers, tmp_path):
    marker = tmp_path / "ran-once"
    (tid,) = submit(queue, [(f"shell:0:0:1:if [ -e {marker} ]; then echo resumed; "
                            f"else touch {marker}; sleep 300; fi")])
    w1 = workers("w1", "--heartbeat-ttl", "30")
    wait_for(lambda: marker.exists() and queue.task(tid).get("pid"), 30, "the task to start")
    orphan = int(queue.task(tid)["pid"])
    w1.signal(signal.SIGKILL)
    w1.wait()
    assert psutil.pid_exists(orphan)
    # Same name, lease still alive for ~30 s: the new instance sees the old one is dead.
    workers("w1", "--heartbeat-ttl", "30")
    wait_for(lambda: state(queue, tid) == "finished", 30, "the task to rerun")
    assert _ended(orphan)
    task = queue.task(tid)
    assert task["attempt"] == "2" and task["stdout_tail"] == "resumed\n"


@pytest.mark.parametrize("successor", ["w0", "w1"], ids=["same name", "another name"])
def test_files_a_killed_worker_left_unrenamed_become_the_recorded_outcome(
        queue, workers, successor):
    """A worker records a task's outcome and then renames the attempt's files to ID.out; a
    kill -9 in between left the record right and ID.out holding an earlier attempt (or
    missing). The state such a kill leaves is set up by hand, which pins the moment: w0 (its
    process gone) recorded A but did not rename its files, and was running B. Whoever takes
    over - w0 restarted, or another worker of the same results directory once w0's lease
    expired - makes A's recorded attempt its output and removes what B's requeued attempt
    wrote."""
    a, b = submit(queue, ["shell:0:0:1:echo a", "shell:0:0:1:echo b-$DISTCOMP_ATTEMPT"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    results = workers.results
    ok, _ = queue.register("w0", "tok-w0", 1000, {
        "host": socket.gethostname(), "pid": gone.pid, "pstart": "1",
        "results_dir": os.path.abspath(results), "room_mb": 1 << 20, "cores": 8})
    assert ok
    assert {c.task_id for c in queue.claim("w0", "tok-w0", 1e9, 1e9, 2)} == {a, b}
    files = {}
    for tid, name, text in ((a, "a1.out", "a\n"), (a, "a1.err", ""), (a, "out", "earlier\n"),
                            (b, "a1.out", "b-")):
        files[tid, name] = results / tid[:2] / f"{tid}.{name}"
        files[tid, name].parent.mkdir(parents=True, exist_ok=True)
        files[tid, name].write_text(text)
    assert queue.finish(a, "w0", 1, {"exit_code": 0, "stdout_tail": "a\n"}) == 1

    w = workers(successor, "--heartbeat-ttl", "2")
    wait_for(lambda: state(queue, b) == "finished", 30, "the requeued task to run again")
    assert files[a, "out"].read_text() == "a\n"
    assert (results / a[:2] / f"{a}.err").exists()
    assert (results / b[:2] / f"{b}.out").read_text() == "b-2\n"
    assert not [p.name for p in results.glob("*/*.a1.*")], "an attempt's files were left"
    assert (a, 1) not in queue.outputs("w0")
    assert "renamed the output files of 1 task(s)" in w.output()


@pytest.fixture
def worker_cgroup():
    """A cgroup of its own for a worker, as its systemd unit gives it: a child of the unified
    (v2) hierarchy. Whatever is left in it dies at the end. Ask for it before ``workers``, which
    then reaps its workers before the cgroup goes."""
    base = Path("/sys/fs/cgroup/unified")
    if not (base / "cgroup.procs").is_file():
        base = Path("/sys/fs/cgroup")
    group = base / f"distcomp-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup under {base}: {exc.strerror}")
    yield group
    _kill_and_remove(group)


def _kill_and_remove(group: Path) -> None:
    """Kill whatever is left in cgroup ``group`` and remove it once its zombies are reaped."""
    for pid in (group / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    wait_for(lambda: _removed(group), 10, "the cgroup to empty (its zombies reaped)")


def _removed(group: Path) -> bool:
    try:
        group.rmdir()
    except OSError:
        return False
    return True


def test_a_worker_that_owns_its_cgroup_kills_what_left_an_ended_tasks_session(
        queue, worker_cgroup, workers, tmp_path):
    """`setsid` takes a process out of its task's session, where the session sweep looked;
    the worker's cgroup still holds it."""
    left = tmp_path / "left"
    (tid,) = submit(queue, [(f"shell:0:0:1:setsid sh -c 'echo $$ > {left}; exec sleep 300' & "
                             f"while [ ! -s {left} ]; do sleep 0.05; done")])
    w = workers("w1", "--own-cgroup", cgroup=worker_cgroup)
    wait_for(lambda: state(queue, tid) == "finished", 30, "the task to finish")
    pid = int(left.read_text())
    wait_for(lambda: _ended(pid), 30, "the process that left the task's session to be killed")
    assert f"killed process {pid}, left running by task {tid} (attempt 1)" in w.output()


def test_a_process_that_hides_its_environment_lives_while_its_task_runs(worker_cgroup,
                                                                       own_redis):
    """ssh-agent, started by a task (`eval $(ssh-agent -s)` before a `git clone`), leaves the
    task's session and makes itself not dumpable: its environment, where the worker reads whose
    process it is, is closed to the worker's user, and it was killed as a stray at the second
    sample while its task ran on. A worker run as an unprivileged user, as the roles run it
    (root reads any environment). A canary that names no task shows two samples have passed."""
    server = own_redis()
    q = Queue(Redis(server.url), "veil")
    shared = Path(tempfile.mkdtemp(prefix="distcomp-veil-"))
    shared.chmod(0o777)
    veiled, canary, done = shared / "veiled", shared / "canary", shared / "done"
    hide = (f"import ctypes, os, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
            f"open('{veiled}', 'w').write(str(os.getpid())); time.sleep(300)")
    # The system's Python: this one's may be out of that user's reach (under /root).
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    (tid,) = submit(q, [(f'shell:0:0:1:setsid {python} -c "{hide}" & '
                         f"setsid env -i sh -c 'echo $$ > {canary}; exec sleep 300' & "
                         f"while [ ! -e {done} ]; do sleep 0.05; done")])
    env = {**os.environ, "DISTCOMP_REDIS_URL": server.url, "DISTCOMP_NAMESPACE": "veil",
           "DISTCOMP_CONFIG": "", "PYTHONDONTWRITEBYTECODE": "1"}
    log = shared / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(worker_cgroup),
             "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "distcomp", "worker", "--own-cgroup", "--results-dir",
             str(shared / "results"), "--workdir", str(shared), "--python", "/bin/sh",
             "--kill-grace", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent)
    try:
        wait_for(lambda: veiled.exists() and veiled.read_text() and canary.exists()
                 and canary.read_text().strip(), 30, "the task's two processes to start")
        pid, canary_pid = int(veiled.read_text()), int(canary.read_text())
        wait_for(lambda: _ended(canary_pid), 30, "the canary, which names no task, to be killed")
        assert not _ended(pid), log.read_text()
        assert state(q, tid) == "running"
        done.touch()
        wait_for(lambda: state(q, tid) == "finished", 30, "the task to finish")
        wait_for(lambda: _ended(pid), 30, "the hidden process to be killed once its task ended")
        assert f"killed process {pid}, left running by no task it names" in log.read_text()
    finally:
        worker.kill()
        worker.wait(10)
        shutil.rmtree(shared, ignore_errors=True)


def test_what_started_the_worker_in_its_cgroup_is_no_stray(queue, worker_cgroup, redis_server,
                                                          namespace, tmp_path):
    """A unit's `sh -c "distcomp worker ...; ..."` (or `sudo -u`) stays in the worker's cgroup
    as its parent, in no task's session and naming no task: it was killed as a stray at the
    second sample. A canary that names no task shows two samples have passed."""
    canary = tmp_path / "canary"
    submit(queue, [(f"shell:0:0:1:setsid env -i sh -c 'echo $$ > {canary}; "
                    f"exec sleep 300' & sleep 300")])
    env = {**os.environ, "DISTCOMP_REDIS_URL": redis_server.url, "DISTCOMP_NAMESPACE": namespace,
           "DISTCOMP_CONFIG": ""}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        wrapper = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec sh -c \'"$@"; echo after\' sh "$@"',
             str(worker_cgroup), sys.executable, "-m", "distcomp", "worker", "--own-cgroup",
             "--results-dir", str(tmp_path / "results"), "--kill-grace", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: canary.exists() and canary.read_text().strip(), 30,
                 "the task's canary to start")
        wait_for(lambda: _ended(int(canary.read_text())), 30,
                 "the canary, which names no task, to be killed")
        assert wrapper.poll() is None, log.read_text()
        assert "left running by no task it names" in log.read_text()
        assert f"killed process {wrapper.pid}," not in log.read_text()
    finally:
        os.killpg(wrapper.pid, signal.SIGKILL)  # the task's processes go with the cgroup
        wrapper.wait(10)


def test_a_worker_that_owns_its_cgroup_counts_what_left_a_running_tasks_session(
        queue, worker_cgroup, workers, tmp_path, client):
    """A process that left its task's session while the task runs is part of the task: its
    memory counts toward the task's (eviction, recorded peak), and it dies with the task."""
    ready, done = tmp_path / "ready", tmp_path / "done"
    hold = (f"import os, time; b = b'x' * (200 << 20); "
            f"open('{ready}', 'w').write(str(os.getpid())); time.sleep(300)")
    (tid,) = submit(queue, [(f'shell:0:0:1:setsid {sys.executable} -c "{hold}" & '
                             f"while [ ! -e {done} ]; do sleep 0.05; done")])
    workers("w1", "--own-cgroup", "--heartbeat-ttl", "2", cgroup=worker_cgroup)
    wait_for(lambda: ready.exists() and ready.read_text(), 30,
             "the task's process in a new session to take 200 MiB")
    pid = int(ready.read_text())
    assert os.getsid(pid) == pid
    wait_for(lambda: int(client.hget(queue.key("w", "w1"), "tasks_rss") or 0) > 200 << 20, 30,
             "the worker to count that memory as its task's")
    done.touch()
    wait_for(lambda: state(queue, tid) == "finished", 30, "the task to finish")
    task = queue.task(tid)
    assert int(task["peak_mem"]) > 200 << 20
    wait_for(lambda: _ended(pid), 30, "the process that left the task's session to be killed")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_a_stop_signal_requeues_running_tasks_promptly(queue, workers, tmp_path, client, sig):
    """HUP as TERM: closing the terminal or ssh session of a worker started by hand used to
    kill it outright, and its tasks, in sessions of their own, ran on listed as running."""
    (tid,) = submit(queue, ["shell:0:0:1:sleep 300"])
    w1 = workers("w1")
    wait_for(lambda: queue.task(tid).get("pid"), 30, "the task to start")
    pid = int(queue.task(tid)["pid"])
    w1.signal(sig)
    assert w1.wait(30) == 0
    task = queue.task(tid)
    assert task["state"] == "todo" and task["reason"] == "requeued: worker w1 was stopped"
    assert queue.counts()["running"] == 0
    assert _ended(pid)
    assert not client.exists(queue.key("lease", "w1"))


def test_a_stop_signal_while_waiting_for_a_held_name_stops_the_worker_cleanly(queue, workers,
                                                                              client):
    """The worker installed its stop handlers only after taking its name: a TERM before that,
    here while another instance's lease holds the name, killed it by the signal."""
    assert queue.register("w1", "other", 3_600_000, {"host": "elsewhere", "pid": 1,
                                                     "room_mb": 1024, "cores": 2})[0]
    w1 = workers("w1", wait_registered=False)
    wait_for(lambda: "waiting for its lease to expire" in w1.output(), 30,
             "the worker to wait for the name")
    w1.signal(signal.SIGTERM)
    assert w1.wait(30) == 0, w1.output()
    assert "worker w1 stopped before it could take its name" in w1.output()
    assert client.hget(queue.key("w", "w1"), "host") == b"elsewhere"


def start_worker_through(code: str, redis_server, namespace: str, tmp_path: Path,
                         *args: str) -> tuple[subprocess.Popen, Path]:
    """A worker run by the Python ``code``, which gets the worker's command line (what
    follows ``distcomp``) as ``sys.argv[1:]``: for how a worker is started, or a fault put
    into it, where WorkerProcess runs ``distcomp worker`` itself. Returns it and its log."""
    log = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
    env = {**os.environ, "DISTCOMP_REDIS_URL": redis_server.url, "DISTCOMP_NAMESPACE": namespace,
           "DISTCOMP_CONFIG": os.devnull}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "worker", "--results-dir", str(tmp_path / "results"),
             "--kill-grace", "1", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def test_a_worker_started_with_sigchld_ignored_records_exit_codes(redis_server, namespace,
                                                                 queue, tmp_path):
    """A parent that ignores SIGCHLD passes that on across exec, and then the kernel reaps the
    tasks itself: their exit statuses were lost, and every task was recorded finished with
    exit code 0, `exit 3` too."""
    (tid,) = submit(queue, [json.dumps({"type": "shell", "params": "exit 3", "max_retries": 0})])
    ignoring = ("import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
                "os.execv(sys.executable, [sys.executable, '-m', 'distcomp', *sys.argv[1:]])")
    proc, log = start_worker_through(ignoring, redis_server, namespace, tmp_path,
                                     "--name", "w-ign", "--exit-when-empty")
    assert proc.wait(60) == 0, log.read_text()
    task = queue.task(tid)
    assert (task["state"], task["exit_code"], task["reason"]) == ("failed", "3", "exit code 3")


def test_an_unexpected_error_hands_the_running_tasks_back_before_the_worker_exits(
        redis_server, namespace, queue, tmp_path):
    """Whatever escapes the loop (here an I/O error put into the heartbeat) ends the worker,
    but not before its running tasks are back in the queue and their processes dead, a task
    that ignores TERM too: they used to run on, listed as running, with nobody to report
    them."""
    trigger = tmp_path / "fail-now"
    (tid,) = submit(queue, ["shell:0:0:1:trap '' TERM; sleep 300"])
    failing = (
        "import errno, os, sys\n"
        "from distcomp.cli import main\n"
        "from distcomp.worker import Worker\n"
        "beat = Worker.heartbeat\n"
        "def heartbeat(self):\n"
        f"    if os.path.exists({str(trigger)!r}):\n"
        "        raise OSError(errno.EIO, 'injected')\n"
        "    beat(self)\n"
        "Worker.heartbeat = heartbeat\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc, log = start_worker_through(failing, redis_server, namespace, tmp_path,
                                     "--name", "w-err", "--heartbeat-ttl", "2")
    pid = None
    try:
        wait_for(lambda: (queue.task(tid) or {}).get("pid") or proc.poll() is not None, 30,
                 "the task to start")
        pid = int(queue.task(tid)["pid"])
        trigger.touch()
        assert proc.wait(30) == 1, log.read_text()
        assert "OSError: [Errno 5] injected" in log.read_text()
        task = queue.task(tid)
        assert (task["state"], task.get("reason")) == (
            "todo", "requeued: worker w-err was stopped")
        assert queue.counts()["running"] == 0
        assert _ended(pid), "the task's process outlived its worker"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


def test_drain_lets_running_tasks_finish(queue, workers, tmp_path):
    go = tmp_path / "go"
    started = tmp_path / "started"
    (tid,) = submit(queue, [(f"shell:0:0:1:touch {started}; while [ ! -e {go} ]; do sleep 0.05; "
                            f"done; echo drained")])
    w1 = workers("w1", "--drain")
    wait_for(started.exists, 30, "the task to start")
    w1.signal(signal.SIGTERM)
    go.touch()
    assert w1.wait(30) == 0
    task = queue.task(tid)
    assert task["state"] == "finished" and task["stdout_tail"] == "drained\n"


def test_stop_workers_drains_and_exits_with_status_10(queue, workers, cli):
    w1 = workers("w1")
    cli("stop-workers", check=True)
    assert w1.wait(30) == 10


def test_cancel_kills_a_running_task(queue, workers, cli):
    (tid,) = submit(queue, ["shell:0:0:1:sleep 300"])
    workers("w1")
    wait_for(lambda: queue.task(tid).get("pid"), 30, "the task to start")
    cli("cancel", tid, check=True)
    wait_for(lambda: state(queue, tid) == "failed", 30, "the cancel")
    assert queue.task(tid)["reason"] == "cancelled"


def test_workers_listing_and_admission_by_cores(queue, workers, cli, tmp_path):
    gate = tmp_path / "gate"
    ids = submit(queue, [f"shell:0:0:2:while [ ! -e {gate} ]; do sleep 0.05; done; echo {i}"
                         for i in range(3)])
    workers("w1", "--cores", "4")
    wait_for(lambda: queue.counts()["running"] == 2, 30, "two tasks to start")
    rows = json.loads(cli("workers", "--json", check=True).stdout)
    (row,) = rows
    assert row["name"] == "w1" and row["alive"] and row["cores"] == 4
    wait_for(lambda: json.loads(cli("workers", "--json").stdout)[0]["running"] == 2, 10,
             "the heartbeat to report two running tasks")
    assert queue.counts()["todo"] == 1, "two 2-core tasks fill a 4-core worker"
    gate.touch()
    wait_for(lambda: drained(queue), 30, "the queue to drain")
    assert all(state(queue, i) == "finished" for i in ids)


def test_worker_refuses_impossible_memory_settings(queue, workers):
    w = workers("w1", "--memory-limit", "100M", "--memory-reserve", "200M",
                wait_registered=False)
    assert w.wait(30) == 2
    assert "memory settings do not fit" in w.output()


def test_python_tasks_use_the_configured_interpreter(queue, workers):
    (tid,) = submit(queue, ['python:0:0:1:-c "import sys; print(sys.executable)"'])
    workers("w1", "--python", sys.executable)
    wait_for(lambda: state(queue, tid) == "finished", 30, "the task")
    assert queue.task(tid)["stdout_tail"].strip() == sys.executable


def test_huge_output_goes_to_files_and_redis_keeps_a_bounded_tail(queue, workers):
    (tid,) = submit(queue, ["shell:0:0:1:head -c 200000000 /dev/zero | tr '\\0' x; echo; echo END"])
    workers("w1")
    wait_for(lambda: state(queue, tid) == "finished", 120, "the flood to finish")
    task = queue.task(tid)
    assert task["stdout_tail"].endswith("x\nEND\n") and len(task["stdout_tail"]) == 4096
    out = workers.results / tid[:2] / f"{tid}.out"
    assert out.stat().st_size == 200_000_000 + len("\nEND\n")


def test_tasks_reserving_no_cores_are_capped_per_core(queue, workers, tmp_path):
    gate = tmp_path / "gate"
    submit(queue, [f"shell:0:0:0:while [ ! -e {gate} ]; do sleep 0.05; done; echo {i}"
                   for i in range(40)])
    workers("w1", "--cores", "2")
    wait_for(lambda: queue.counts()["running"] == 32, 30, "32 tasks (16 per core) to start")
    assert queue.counts()["todo"] == 8
    gate.touch()
    wait_for(lambda: drained(queue), 60, "the queue to drain")


@pytest.fixture
def memory_cgroup():
    """``memory_cgroup(mib)``: a cgroup v1 memory group limited to ``mib`` MiB, for a worker
    to start in; whatever is left in it is killed at the end."""
    from tests.test_resources import _own_v1_memory_cgroup

    parent = _own_v1_memory_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("no writable cgroup v1 memory controller")
    made: list[Path] = []

    def make(mib: int) -> Path:
        group = parent / f"distcomp-worker-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        made.append(group)
        (group / "memory.limit_in_bytes").write_text(str(mib << 20))
        return group

    yield make
    for group in made:
        _kill_and_remove(group)


def _oom_kills(group: Path) -> int:
    """The kernel's OOM kills in a v1 memory cgroup (``memory.oom_control``)."""
    fields = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    return int(fields["oom_kill"])


def test_worker_in_a_memory_cgroup_never_leaves_a_task_to_the_oom_killer(
        queue, client, workers, memory_cgroup):
    """A worker inside a real 300 MiB cgroup (no --memory-limit: capacity comes from the cgroup)
    runs a task that grabs 1 GiB fast. Whether the worker evicts it first or the kernel kills it,
    the task must end failed with a reason about memory, and the worker must survive."""
    (tid,) = submit(queue, [f"python:0:0:1:{GROW} 1000 0.001 5"])
    # The default reserve (256 MiB at least) would leave this node 44 MiB, and evicting below
    # half of it depended on how much of the worker's own page cache the cgroup was charged:
    # under load the 7 MiB task was evicted at its start until its budget ran out.
    w = workers("cg", "--memory-reserve", "60M", "--evict-below", "40M",
                cgroup=memory_cgroup(300))
    wait_for(lambda: state(queue, tid) == "failed", 60, "the task to fail")
    reason = queue.task(tid)["reason"]
    # Worker first: "needs more memory than node cg has ..."; kernel first: the OOM kill is
    # requeued as an eviction and the queue finds no worker with room: "needs N MiB ...".
    assert reason.startswith("needs "), reason
    assert w.proc.poll() is None, "the worker survives"
    assert int(client.hget(queue.key("w", "cg"), "mem_total")) == 300 << 20


@pytest.mark.parametrize("shape", ["the task's process", "a process the task started"])
def test_a_task_the_kernel_kills_for_memory_is_requeued_as_an_eviction(
        queue, client, workers, memory_cgroup, tmp_path, shape):
    """The worker is frozen (SIGSTOP) while its task grows past the cgroup's 300 MiB, so that
    the kernel's OOM killer acts and not the worker. Thawed, the worker must take the kill for
    what it is, an eviction with the task's peak, not a failure of the task, and survive it.
    The kernel kills the largest process: under `sh -c "prog && next"` that is the program,
    and the task ends with exit code 137, which was taken for a failure of the task and
    retried at the size that had just been too small."""
    cue = tmp_path / "grow-now"
    grow = f"{GROW} 600 0.001 5 after={cue}"
    (tid,) = submit(queue, [f"python:0:0:1:{grow}" if shape == "the task's process" else
                            f"shell:0:0:1:{sys.executable} {grow} && echo grown"])
    group = memory_cgroup(300)
    w = workers("cg", "--memory-reserve", "60M", "--evict-below", "40M", cgroup=group)
    wait_for(lambda: client.hget(queue.key("t", tid), "pstart"), 30,
             "the task to start and be annotated")
    task_pid = int(client.hget(queue.key("t", tid), "pid"))
    w.signal(signal.SIGSTOP)
    try:
        cue.touch()
        wait_for(lambda: _ended(task_pid), 30, "the kernel to kill the task")
        assert _oom_kills(group) == 1, w.output()
    finally:
        w.signal(signal.SIGCONT)
    # Requeued with its peak, or failed at once if that is more than the node has room for:
    # either way an eviction. (Run again, it may be killed again: what follows is not waited.)
    try:
        wait_for(lambda: client.hget(queue.key("t", tid), "evictions"), 60,
                 "the kill to be reported")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the worker said:\n{w.output()}") from None
    task = queue.task(tid)
    assert "failures" not in task, (task, w.output())
    assert (f"task {tid} was killed by the kernel OOM killer" if shape == "the task's process"
            else f"task {tid} ended (exit code 137) after the kernel OOM killer killed a "
                 f"process of it") in w.output()
    assert w.proc.poll() is None, "the worker survives"


def test_a_task_started_after_a_kernel_oom_kill_is_not_taken_for_its_victim(
        queue, client, workers, memory_cgroup, tmp_path):
    """A task is measured against the OOM count of the worker's last sample: one claimed into
    the room an OOM-killed task left, before the next sample, counted that kill as its own,
    and its failure (exit 2) was taken for an eviction, retried against the eviction budget.
    Samples a minute apart keep the worker from evicting first and from reading the count."""
    (tmp_path / "none.conf").write_text("[worker]\nsample_interval = 60\n")
    big, small = submit(queue, [f"python:5:0:1:{GROW} 600 0.001 5",
                                json.dumps({"type": "shell", "params": "exit 2",
                                            "max_retries": 0})])
    group = memory_cgroup(300)
    w = workers("cg", "--memory-reserve", "60M", "--evict-below", "40M", "--max-tasks", "1",
                cgroup=group)
    wait_for(lambda: state(queue, small) == "failed", 60, "the small task to fail")
    # Killed once, or again and again when the kernel struck before it outgrew the room (a
    # loaded machine's page cache in the cgroup): the small task starts after the last kill.
    assert _oom_kills(group) >= 1, w.output()
    assert queue.task(big).get("evictions"), (queue.task(big), w.output())
    task = queue.task(small)
    assert task["reason"] == "exit code 2" and "evictions" not in task, (task, w.output())


def _waiting_for_a_reply(port: int) -> bool:
    """Whether a connection to the Redis at ``port`` has bytes Redis has not read yet (from
    /proc/net/tcp: its local end, established, with a receive queue)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state_hex, queues = fields[1], fields[3], fields[4]
        if int(local.split(":")[1], 16) == port and state_hex == "01" and \
                int(queues.split(":")[1], 16) > 0:
            return True
    return False


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_worker_waiting_on_a_frozen_redis_still_evicts_before_the_kernel_kills(
        tmp_path, memory_cgroup, own_redis):
    """The loop waits on a Redis call for up to its timeout and a retry (2.5 s each here). A
    task that grows past the node's memory meanwhile must still be evicted by the worker, not
    OOM-killed by the kernel: the worker's state passes to its guard thread while the loop
    waits. Redis is frozen (SIGSTOP) and the task grows (200 MB/s, into a 400 MiB cgroup) only
    once the worker has sent a request Redis has not read; the old loop evicted nothing until
    the call failed, and the kernel killed the task first."""
    server = own_redis()
    client = redis.Redis.from_url(server.url)
    queue = Queue(Redis(server.url), f"frz{uuid.uuid4().hex[:6]}")
    cue = tmp_path / "grow-now"
    (tid,) = submit(queue, [f"python:0:0:1:{GROW} 1000 0.05 5 after={cue}"])
    group = memory_cgroup(400)
    w = WorkerProcess(server, queue.ns, "frz", tmp_path / "results", [], cgroup=group)
    try:
        wait_for(lambda: client.hget(queue.key("t", tid), "pstart"), 30,
                 "the task to start and be annotated")
        task_pid = int(client.hget(queue.key("t", tid), "pid"))
        server.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: _waiting_for_a_reply(server.port), 30,
                     "the worker to wait on a request to the frozen Redis")
            cue.touch()
            wait_for(lambda: _ended(task_pid), 30, "the task to be killed")
            assert _oom_kills(group) == 0, w.output()
        finally:
            server.proc.send_signal(signal.SIGCONT)
        # Evicted while running alone: too big for this node, the worker's own verdict (a
        # kernel kill would have been put back in the queue).
        wait_for(lambda: state(queue, tid) == "failed", 30, "the outcome to be recorded")
        assert queue.task(tid)["reason"].startswith("needs more memory than node frz has"), \
            queue.task(tid)["reason"]
        assert f"evicting task {tid}" in w.output()
    finally:
        w.kill_everything()


def test_a_worker_waits_out_redis_refusing_its_password(tmp_path, own_redis, monkeypatch):
    """Redis comes back with another password (restarted by hand, a rotated secret not yet
    rolled out): the worker killed its running tasks and exited. It waits, as for a Redis that
    is away; its task runs on and is recorded once the passwords agree again."""
    server = own_redis("pw-one")
    admin = redis.Redis(port=server.port, password="pw-one")
    monkeypatch.setenv("DISTCOMP_REDIS_PASSWORD", "pw-one")
    queue = Queue(Redis(server.url, password="pw-one"), f"pw{uuid.uuid4().hex[:6]}")
    cue = tmp_path / "end-now"
    (tid,) = submit(queue, [f"shell:0:0:1:while [ ! -e {cue} ]; do sleep 0.05; done"])
    w = WorkerProcess(server, queue.ns, "pw", tmp_path / "results", [])
    try:
        wait_for(lambda: admin.hget(queue.key("t", tid), "pstart"), 30, "the task to start")
        task_pid = int(admin.hget(queue.key("t", tid), "pid"))
        admin.config_set("requirepass", "pw-two")  # this connection stays signed in
        admin.client_kill_filter(_type="normal", skipme=True)
        wait_for(lambda: "Redis refuses this worker's password" in w.output(), 30,
                 "the worker to meet the new password")
        assert w.proc.poll() is None and not _ended(task_pid), w.output()
        admin.config_set("requirepass", "pw-one")
        cue.touch()
        wait_for(lambda: admin.hget(queue.key("t", tid), "state") == b"finished", 30,
                 "the task to be recorded")
        assert w.proc.poll() is None, w.output()
    finally:
        w.kill_everything()


def test_a_task_that_exits_while_redis_is_frozen_is_measured_to_its_exit(tmp_path, own_redis):
    """Four tasks of about 2 s end while Redis is frozen, so the loop reaps them only once it is
    back. Their life was measured to the reap and the guard traced them on at 0 bytes: the
    class's forecast said they were usually over by 9 s and held a quarter of their peak."""
    server = own_redis()
    client = redis.Redis.from_url(server.url)
    queue = Queue(Redis(server.url), f"ext{uuid.uuid4().hex[:6]}")
    ids = submit(queue, [f"python:0:0:0:{GROW} 30 0.01 1.5 t{i}" for i in range(4)])
    w = WorkerProcess(server, queue.ns, "ext", tmp_path / "results", ["--cores", "4"])
    try:
        wait_for(lambda: all(client.hget(queue.key("t", t), "pstart") for t in ids), 30,
                 "the tasks to start and be annotated")
        pids = [int(client.hget(queue.key("t", t), "pid")) for t in ids]
        server.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: all(_ended(p) for p in pids), 30, "the tasks to exit")
            # The scenario, not a synchronisation: Redis stays away 3 s longer, the worker
            # waiting on it (and its guard sampling) the whole time.
            time.sleep(3)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: all(state(queue, t) == "finished" for t in ids), 60,
                 "the tasks to be recorded")
        wait_for(lambda: "forecasting their memory" in w.output(), 30, "the class's forecast")
        life = float(re.search(r"usually over by ([0-9.]+) s", w.output()).group(1))
        assert life < 4, w.output()
    finally:
        w.kill_everything()


def test_a_worker_waiting_on_a_frozen_redis_still_enforces_time_limits(tmp_path, own_redis):
    """The guard also kills a task at its time limit while the loop waits on Redis. Redis is
    frozen and a second task ends, so that the loop's report of it waits (5 s and a retry, with
    a 20 s lease) from about 0.5 s into the first task's 5 s limit. The first task notes the
    TERM; the old loop sent it only after its call had failed, so after its log said so."""
    server = own_redis()
    client = redis.Redis.from_url(server.url)
    queue = Queue(Redis(server.url), f"lim{uuid.uuid4().hex[:6]}")
    termed, cue = tmp_path / "termed", tmp_path / "end-now"
    limited = json.dumps({"type": "shell", "min_cpu": 0, "timeout_s": 5,
                          "params": f"trap 'touch {termed}; exit 1' TERM; sleep 60 & wait"})
    (lid, eid) = submit(queue, [limited, f"python:0:0:0:{GROW} 0 0 0 after={cue}"])
    w = WorkerProcess(server, queue.ns, "lim", tmp_path / "results", ["--heartbeat-ttl", "20"])
    try:
        wait_for(lambda: all(client.hget(queue.key("t", t), "pstart") for t in (lid, eid)), 30,
                 "both tasks to start and be annotated")
        server.proc.send_signal(signal.SIGSTOP)
        try:
            cue.touch()
            wait_for(lambda: _waiting_for_a_reply(server.port), 30,
                     "the worker to wait on its report to the frozen Redis")
            assert not termed.exists(), "the time limit ran out before Redis was frozen"
            wait_for(termed.exists, 30, "the limited task to get its TERM")
            assert "cannot reach Redis" not in w.output(), w.output()
        finally:
            server.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: state(queue, lid) == "failed", 30, "the limited task's outcome")
        assert "timed out" in queue.task(lid)["reason"], queue.task(lid)["reason"]
        wait_for(lambda: state(queue, eid) == "finished", 30, "the other task's outcome")
    finally:
        w.kill_everything()


def test_tasks_claimed_while_the_guard_evicts_go_back_unstarted(tmp_path, memory_cgroup,
                                                                 own_redis):
    """A claim measures memory when it is sent. If the guard evicts while the claim waits on
    Redis, memory ran short since then and the victim has not given its memory back: what the
    claim brings must go back to the queue, not start into that. Here a worker of two slots
    runs a task that grows on cue and one that ends on cue; Redis is frozen right after a
    heartbeat, the second task ends so that the loop's claim (of a queued third task) waits,
    then the first grows past the 400 MiB cgroup and is evicted. The old loop started the third
    task from that claim (attempt 1)."""
    server = own_redis()
    client = redis.Redis.from_url(server.url)
    queue = Queue(Redis(server.url), f"unst{uuid.uuid4().hex[:6]}")
    grow_cue, end_cue = tmp_path / "grow-now", tmp_path / "end-now"
    gid, eid, later = submit(queue, [f"python:5:0:0:{GROW} 1000 0.05 5 after={grow_cue}",
                                     f"python:5:0:0:{GROW} 0 0 0 after={end_cue}",
                                     "shell:0:0:0:true"])
    w = WorkerProcess(server, queue.ns, "unst", tmp_path / "results",
                      ["--max-tasks", "2", "--heartbeat-ttl", "20"],
                      cgroup=memory_cgroup(400))
    lease = queue.key("lease", "unst")
    try:
        wait_for(lambda: all(client.hget(queue.key("t", t), "pstart") for t in (gid, eid)), 30,
                 "both tasks to start and be annotated")
        grow_pid = int(client.hget(queue.key("t", gid), "pid"))
        # Heartbeats come every 5 s: freezing within 0.1 s of one leaves the claim the one call
        # that waits.
        wait_for(lambda: client.pttl(lease) > 19_900, 30, "a heartbeat", interval=0.01)
        server.proc.send_signal(signal.SIGSTOP)
        try:
            end_cue.touch()
            wait_for(lambda: _waiting_for_a_reply(server.port), 30,
                     "the worker to wait on its claim to the frozen Redis")
            grow_cue.touch()
            wait_for(lambda: _ended(grow_pid), 30, "the growing task to be evicted")
        finally:
            server.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: state(queue, later) == "finished", 30, "the third task to run")
        assert queue.task(later)["attempt"] == "2", (queue.task(later), w.output())
        assert "putting 1 claimed task(s) back in the queue unstarted" in w.output(), w.output()
        assert state(queue, eid) == "finished"
    finally:
        w.kill_everything()


def test_idle_worker_claims_announced_tasks_at_once_also_after_redis_restarts(tmp_path, own_redis):
    """With --idle-poll 600 an idle worker does not claim again for ten minutes on its own: it
    takes tasks submitted later because the queue announces them. Notices sent while it is
    cut off are lost, so after Redis restarts it must subscribe again (and claim then)."""
    server = own_redis()
    q = Queue(Redis(server.url), "idle")
    w = WorkerProcess(server, "idle", "w-idle", tmp_path / "results",
                      ["--idle-poll", "600", "--log-level", "debug"])
    empty = "claim came back empty; next claim in 600s"
    try:
        # The loop claims once at its start and once more when the subscription is confirmed;
        # after the second empty claim only a notice (or ten minutes) brings another.
        wait_for(lambda: w.output().count(empty) >= 2 or w.proc.poll() is not None, 30,
                 "the worker to subscribe and go idle")
        assert w.proc.poll() is None, w.output()
        first = submit(q, ["shell:0:0:1:true first"])
        wait_for(lambda: state(q, first[0]) == "finished", 60, "the announced task to run")

        server.stop()
        server.start()  # same port, empty: nothing was persisted
        wait_for(lambda: redis.Redis(port=server.port).pubsub_numsub(q.key("wake"))[0][1] == 1, 60,
                 "the worker to subscribe again")
        second = submit(q, ["shell:0:0:1:true second"])
        wait_for(lambda: state(q, second[0]) == "finished", 60,
                 "a task announced after the restart to run")
        assert w.proc.poll() is None, w.output()
    finally:
        w.kill_everything()


@pytest.mark.parametrize("args, named", [
    (["--cores", "-1"], "cores"), (["--cores", "nan"], "cores"),
    (["--heartbeat-ttl", "0"], "heartbeat_ttl"), (["--heartbeat-ttl", "nan"], "heartbeat_ttl"),
    (["--max-tasks", "-1"], "max_tasks"), (["--kill-grace", "-1"], "kill_grace"),
    (["--default-timeout", "-5"], "default_timeout"),
    (["--eviction-budget", "-1"], "eviction_budget"), (["--name", ""], "worker name"),
    (["--name", "a,b"], "worker name"), (["--name", "a#1"], "worker name"),
    (["--name", "a b"], "worker name"), (["--name", "a\tb"], "worker name"),
    # Meant as 4096 MB: 4096 bytes failed every task it claimed, for lack of room.
    (["--memory-limit", "4096"], "memory_limit is 4096 bytes, too little to run a task in"),
    (["--memory-limit", "4096"], "(a number without a unit is bytes): give a unit, e.g. 4096M"),
    # Every python task it claimed failed to start, until its retries ran out.
    (["--python", "/nonexistent/python3"], "python interpreter '/nonexistent/python3' is not"),
])
def test_a_worker_refuses_settings_it_cannot_run_with(redis_server, namespace, queue, tmp_path,
                                                      args, named):
    env = {**os.environ, "DISTCOMP_REDIS_URL": redis_server.url, "DISTCOMP_NAMESPACE": namespace,
           "DISTCOMP_CONFIG": str(tmp_path / "none.conf")}
    (tmp_path / "none.conf").touch()
    proc = subprocess.run([sys.executable, "-m", "distcomp", "worker", "--results-dir",
                           str(tmp_path / "r"), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("distcomp: error: ")
    assert named in proc.stderr
    assert queue.workers() == []


@pytest.mark.parametrize("where", ["DISTCOMP_REDIS_PASSWORD", "the URL", "REDISCLI_AUTH",
                                   "another variable"])
def test_tasks_do_not_get_the_redis_password_in_their_environment(tmp_path, where, own_redis):
    """A task that prints its environment (`env` while debugging) would put the password in its
    output file, on the shared file system; redis-cli's REDISCLI_AUTH, or any variable an admin
    kept it in, got to every task."""
    server = own_redis("s3cret-for-tasks")
    q = Queue(Redis(server.url, "s3cret-for-tasks"), "env")
    (tid,) = submit(q, ["shell:0:0:1:env"])
    url = server.url.replace("//", "//:s3cret-for-tasks@") if where == "the URL" else server.url
    env = {**os.environ, "DISTCOMP_REDIS_URL": url, "DISTCOMP_NAMESPACE": "env",
           "DISTCOMP_CONFIG": ""}
    if where != "the URL":
        env["DISTCOMP_REDIS_PASSWORD"] = "s3cret-for-tasks"
    if where == "REDISCLI_AUTH":
        env["REDISCLI_AUTH"] = "s3cret-for-tasks"
    if where == "another variable":
        env["LAB_SECRETS"] = "redis=s3cret-for-tasks"
    proc = subprocess.run([sys.executable, "-m", "distcomp", "worker", "--results-dir",
                           str(tmp_path / "r"), "--exit-when-empty"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert state(q, tid) == "finished"
    seen = (tmp_path / "r" / tid[:2] / f"{tid}.out").read_text()
    assert "DISTCOMP_TASK_ID=" + tid in seen
    assert "s3cret-for-tasks" not in seen
    assert "s3cret-for-tasks" not in proc.stderr


def test_a_task_cannot_read_the_password_from_its_workers_environment(own_redis):
    """Withheld from its environment, the password was still the task's to read: the task runs
    as the worker's user, and /proc/PPID/environ is the worker's environment. A worker run as
    an unprivileged user (as root, a task could read anything)."""
    server = own_redis("s3cret-in-proc")
    q = Queue(Redis(server.url, "s3cret-in-proc"), "proc")
    (tid,) = submit(q, ["shell:0:0:1:tr '\\0' '\\n' < /proc/$PPID/environ; echo read=$?"])
    results = Path(tempfile.mkdtemp(prefix="distcomp-proc-"))
    try:
        results.chmod(0o777)
        env = {**os.environ, "DISTCOMP_REDIS_URL": server.url, "DISTCOMP_NAMESPACE": "proc",
               "DISTCOMP_CONFIG": "", "DISTCOMP_REDIS_PASSWORD": "s3cret-in-proc",
               "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-m", "distcomp", "worker", "--results-dir",
                               str(results), "--workdir", str(results), "--exit-when-empty",
                               # no python task here; the venv's may be out of that user's reach
                               "--python", "/bin/sh"],
                              env=env, capture_output=True, text=True, timeout=60, check=False,
                              cwd=Path(__file__).resolve().parent.parent)
        assert proc.returncode == 0, proc.stderr
        assert state(q, tid) == "finished"
        seen = (results / tid[:2] / f"{tid}.out").read_text()
        assert "read=1" in seen, seen  # the redirection refused
        assert "s3cret-in-proc" not in seen
    finally:
        shutil.rmtree(results)


def test_a_worker_says_what_room_its_tasks_have_and_where_they_run(queue, workers, tmp_path):
    """A 2 GiB worker has 1.75 GiB for tasks (its reserve is 256 MiB): its start said "2.00 GiB
    memory", and a task asking for 2 GB waited for ever beside it. A task's relative path is
    taken from the working directory, the results directory's parent by default, which the
    start did not name: `python3 examples/sim.py` failed from another directory."""
    w = workers("w1", "--memory-limit", "2G", "--memory-reserve", "256M", "--cores", "2")
    wait_for(lambda: "worker w1 up" in w.output(), 30, "the worker to say it is up")
    assert ("worker w1 up: 2 cores, 2.00 GiB memory, 1.75 GiB of it for tasks (reserve 0.25 "
            "GiB") in w.output(), w.output()
    assert f"tasks run in {workers.results.parent} unless they give a cwd" in w.output()


def test_a_worker_says_once_that_redis_is_away_and_once_that_it_is_back(tmp_path, own_redis):
    """While Redis is away the worker retries every second; the loop passes in between make no
    call to Redis and must not be taken for proof that it is back."""
    server = own_redis()
    w = WorkerProcess(server, "away", "w-away", tmp_path / "results", [])
    try:
        wait_for(lambda: "worker w-away up" in w.output(), 30, "the worker to start")
        server.stop()
        # Something that takes connections and drops them stands in for Redis, so that the
        # worker's attempts can be counted: a few rounds of retries, then Redis comes back.
        attempts = []
        with socket.create_server(("127.0.0.1", server.port)) as stand_in:
            while len(attempts) < 15:
                conn, _ = stand_in.accept()
                attempts.append(conn)
                conn.close()
        server.start()
        wait_for(lambda: "Redis answers again" in w.output(), 30, "the worker to reconnect")
        assert w.output().count("cannot reach Redis") == 1, w.output()
        assert w.output().count("Redis answers again") == 1, w.output()
    finally:
        w.kill_everything()


def test_a_worker_rides_out_redis_refusing_writes(tmp_path, own_redis):
    """Redis at its maxmemory (noeviction) refuses the worker's heartbeat and claims: the
    worker keeps its task running, says so once, and goes on when Redis accepts writes again.
    It used to exit, leaving the task running with nobody to report it."""
    server = own_redis()
    q = Queue(Redis(server.url), "full")
    gate = tmp_path / "gate"
    (tid,) = submit(q, [f"shell:0:0:1:while [ ! -e {gate} ]; do sleep 0.05; done"])
    w = WorkerProcess(server, "full", "w-full", tmp_path / "results", [])
    admin = redis.Redis(port=server.port)
    try:
        wait_for(lambda: (q.task(tid) or {}).get("pid"), 30, "the task to start")
        pid = int(q.task(tid)["pid"])
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        wait_for(lambda: "Redis refuses" in w.output() or w.proc.poll() is not None, 30,
                 "the worker to meet the refusal")
        assert w.proc.poll() is None, w.output()
        gate.touch()
        # Its report may get through even so: Redis refuses a script only at a first write
        # that can take memory, and a finish starts by removing the task from sets.
        wait_for(lambda: _ended(pid), 30, "the task to end")
        admin.config_set("maxmemory", 0)
        wait_for(lambda: state(q, tid) == "finished" or w.proc.poll() is not None, 30,
                 "the report to arrive")
        assert w.proc.poll() is None, w.output()
        assert state(q, tid) == "finished"
        assert w.output().count("Redis refuses") == 1, w.output()
    finally:
        w.kill_everything()


def test_worker_learns_what_tasks_of_each_declared_size_really_use(queue, tmp_path):
    """Tasks declaring the same size are charged the mean peak of such tasks when that is more
    than they declare; a declaration larger than what its tasks used stands."""
    from distcomp.worker import PEAK_CLASSES, Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path))), queue)
    for peak_mb in (300, 500):
        w.learn("0.0", peak_mb << 20)
    w.learn("1.0", 600 << 20)
    w.learn("0.25", 400 << 20)
    assert w.charges == {"0.0": 400.0, "0.25": 400.0}
    w.learn("0.25", 50 << 20)  # mean 225 MiB, under the 256 MiB declared
    assert w.charges == {"0.0": 400.0}
    for i in range(PEAK_CLASSES):
        w.learn(f"{i + 10}.0", 1 << 40)
    assert "0.0" not in w.charges and len(w.classes) == PEAK_CLASSES


def test_overcommit_divides_what_learned_tasks_are_charged(queue, tmp_path):
    """With overcommit 2 a class is charged half its mean peak, and a declaration above that
    half is what its tasks are charged again."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), overcommit=2.0)), queue)
    for peak_mb in (300, 500):
        w.learn("0.0", peak_mb << 20)
        w.learn("0.25", peak_mb << 20)
    assert w.charges == {"0.0": 200.0}  # 0.25 GB = 256 MiB declared, more than 400 / 2


def test_overcommit_auto_bets_by_how_much_of_their_peak_tasks_held(queue, tmp_path):
    """auto: a class is charged its mean peak / sqrt(1 / mean fill), at most 2, once 4 of its
    tasks that ended on their own were measured; evicted tasks (fill None) do not count."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), overcommit="auto")), queue)
    for _ in range(3):
        w.learn("0.0", 400 << 20, 0.25)
        w.learn("0.1", 400 << 20, 0.01)
    w.learn("0.0", 400 << 20, None)
    w.learn("0.5", 800 << 20, 1.0)
    assert w.charges == {"0.0": 400.0, "0.1": 400.0, "0.5": 800.0}  # too few fills yet
    w.learn("0.0", 400 << 20, 0.25)
    w.learn("0.1", 400 << 20, 0.01)
    for _ in range(3):
        w.learn("0.5", 800 << 20, 1.0)
    assert w.charges == {"0.0": 200.0, "0.1": 200.0, "0.5": 800.0}  # 1/sqrt(0.25); at most 2


def test_overcommit_auto_measures_how_much_of_its_peak_each_task_held(queue, workers):
    """Real tasks, real sampling: tasks that grow through their whole run hold about half their
    peak and get a bet above 1; tasks that reach their peak at once and hold it get none."""
    growers = [f"python:0:0:1:{GROW} 150 0.1 0 grower{i}" for i in range(5)]
    holders = [f"python:0:0.1:1:{GROW} 150 0 3 holder{i}" for i in range(5)]
    submit(queue, growers + holders)
    w = workers("w1", "--cores", "4", "--overcommit", "auto")
    wait_for(lambda: drained(queue), 120, "the queue to drain")
    logged = re.findall(r"tasks declaring (\S+) GB held (\d+)% of their peak over their run: "
                        r"charging them their mean peak / ([\d.]+)", w.output())
    last = {declared: (int(held), float(factor)) for declared, held, factor in logged}
    held, factor = last.get("0.0", (100, 1.0))
    assert 35 <= held <= 75 and factor >= 1.15, w.output()
    # Holders may log a small bet when a slow start-up counts against them, never a real one.
    assert last.get("0.1", (100, 1.0))[1] <= 1.1, w.output()
    assert ", overcommit auto)" in w.output()


def test_a_forecast_starts_a_task_beside_ones_that_will_be_gone_before_it_grows(queue, workers):
    """Tasks that grow to 300 MB through their run, on a node with 768 MiB for tasks: charged
    their peak, two fit at once. Once four have ended on their own the worker forecasts the
    class, and starts a third while two still run, since they end before it has grown much."""
    ids = submit(queue, [f"python:0:0:1:{GROW} 300 0.06 0 t{i}" for i in range(12)])
    w = workers("w1", "--cores", "3", "--memory-limit", "1G")
    wait_for(lambda: drained(queue), 180, "the queue to drain")
    assert "tasks declaring 0.0 GB: forecasting their memory over their run" in w.output()
    tasks = [queue.task(i) for i in ids]
    assert {t["state"] for t in tasks} == {"finished"}, w.output()
    spans = [(float(t["started"]), float(t["ended"])) for t in tasks]
    most = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert most == 3, w.output()


def test_without_access_to_channels_tasks_are_still_submitted_and_run(tmp_path, own_redis):
    """Redis 7 gives a new ACL user no pub/sub channels unless told: submits and reports must
    still work for such a user, and its workers fall back to claiming every idle_poll."""
    server = own_redis()
    redis.Redis(port=server.port).acl_setuser("nochan", enabled=True, passwords=["+pw-nochan"],
                                              keys=["*"], commands=["+@all"], reset_channels=True)
    url = f"redis://nochan:pw-nochan@127.0.0.1:{server.port}/0"
    q = Queue(Redis(url), "acl")
    ids = submit(q, ["shell:0:0:1:true one", "shell:0:0:1:true two"])
    w = WorkerProcess(SimpleNamespace(url=url), "acl", "w-acl", tmp_path / "results",
                      ["--idle-poll", "0.2"])
    try:
        wait_for(lambda: all(state(q, i) == "finished" for i in ids) or w.proc.poll() is not None,
                 60, "the tasks to run")
        more = submit(q, ["shell:0:0:1:true three"])
        wait_for(lambda: state(q, more[0]) == "finished", 60, "a later task to run by polling")
        assert w.proc.poll() is None, w.output()
        assert "cannot subscribe to acl:wake" in w.output()
    finally:
        w.kill_everything()


def test_wait_returns_as_soon_as_the_last_task_is_recorded(queue, client, workers, redis_server,
                                                           namespace):
    """With --interval 600 `distcomp wait` checks the queue every ten minutes on its own: it
    must return when the queue announces that nothing is left todo or running."""
    submit(queue, ["shell:0:0:1:true done",
                   json.dumps({"type": "shell", "params": "exit 3", "max_retries": 0})])
    env = {**os.environ, "DISTCOMP_REDIS_URL": redis_server.url, "DISTCOMP_NAMESPACE": namespace,
           "DISTCOMP_CONFIG": os.devnull}
    waiter = subprocess.Popen([sys.executable, "-m", "distcomp", "wait", "--interval", "600",
                               "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: client.pubsub_numsub(queue.key("drained"))[0][1] == 1
                 or waiter.poll() is not None, 30, "wait to subscribe")
        assert waiter.poll() is None, waiter.communicate()
        workers("w1", "--cores", "2")
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 1, err  # one task failed
    assert json.loads(out) == {"finished": 1, "failed": 1}


def test_submit_wait_queues_then_returns_when_the_queue_drains(workers, cli, queue):
    """`submit --wait` is submit followed by wait in one command: it says what it queued at
    once, returns when nothing is left todo or running, and exits 1 when the queue holds a
    failed task, as `distcomp wait` does."""
    workers("w1", "--cores", "2")
    tasks = ("shell:0:0:1:sleep 0.2\n"
             + json.dumps({"type": "shell", "params": "exit 3", "max_retries": 0}) + "\n")
    proc = cli("submit", "-", "--wait", "--interval", "600", input=tasks.encode())
    assert proc.returncode == 1, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == [
        "<stdin>: added 2 task(s), 0 already queued",
        # export gives only the reason ("exit code 3"); show has what the task wrote
        ("queue drained: 1 finished, 1 failed (which and why: `distcomp status --state failed`, "
         "a task's output: `distcomp show ID`; run them again: `distcomp retry --all`)")]
    assert queue.counts()["finished"] == 1
    proc = cli("submit", "-", "--wait", "--json", input=b"shell:0:0:1:true again\n")
    assert proc.returncode == 1, proc.stderr.decode()  # the queue still holds the failed task
    assert json.loads(proc.stdout) == {"added": 1, "existing": 0, "duplicates": 0, "invalid": 0,
                                       "finished": 2, "failed": 1}


def test_workers_tell_a_clean_stop_from_a_lost_worker(queue, client, workers, cli):
    ids = submit(queue, [f"shell:0:0:1:echo {i}" for i in range(5)])
    # Not waited for as registered: it may run the five echos and leave before a poll sees it.
    clean = workers("clean", "--exit-when-empty", wait_registered=False)
    assert clean.wait(60) == 0
    lost = workers("lost", "--heartbeat-ttl", "1")
    lost.proc.kill()
    lost.wait()
    wait_for(lambda: not client.exists(queue.key("lease", "lost")), 30,
             "the killed worker's lease to expire")
    rows = {w["name"]: w for w in json.loads(cli("workers", "--json", check=True).stdout)}
    assert (rows["clean"]["alive"], rows["clean"]["stopped"]) == (False, True)
    assert (rows["clean"]["done"], rows["clean"]["running"]) == (5, 0), \
        "a worker that exits before its next heartbeat still reports all it did"
    assert (rows["lost"]["alive"], rows["lost"]["stopped"]) == (False, False)
    table = cli("workers", check=True).stdout.decode().splitlines()
    assert table[0].split()[:2] == ["NAME", "STATE"]
    states = {line.split()[0]: line.split()[1] for line in table[1:3]}
    assert states == {"clean": "stopped", "lost": "lost"}
    assert table[3].startswith("lost: the lease expired without a clean stop")
    assert all(state(queue, i) == "finished" for i in ids)


def test_a_task_claimed_back_while_its_old_run_lives_replaces_it(queue, workers):
    """`requeue --worker W` wakes W, which can claim the task back before a heartbeat tells it
    the task was taken away. The old run was then left running beside the new attempt, never
    reaped (a zombie whose ready pidfd spun the loop) and its files never removed."""
    (tid,) = submit(queue, ["shell:0:0:1:echo $DISTCOMP_ATTEMPT; exec sleep 600"])
    w = workers("w1", "--cores", "2", "--heartbeat-ttl", "600")
    wait_for(lambda: queue.task(tid).get("pstart"), 30, "the task to start and be annotated")
    first = int(queue.task(tid)["pid"])
    assert queue.requeue_worker("w1", "requeued by hand") == 1
    wait_for(lambda: queue.task(tid).get("attempt") == "2" and queue.task(tid).get("pstart"),
             30, "the task to be claimed again and annotated")
    second = int(queue.task(tid)["pid"])
    assert second != first
    wait_for(lambda: not psutil.pid_exists(first), 30, "the old run to be killed and reaped")
    assert psutil.Process(second).status() != psutil.STATUS_ZOMBIE
    wait_for(lambda: not list(workers.results.glob(f"*/{tid}.a1.*")), 30,
             "the old attempt's files to go")
    assert f"task {tid} was taken away from this worker and claimed again as attempt 2" in \
        w.output()
    assert w.proc.poll() is None


def test_a_results_directory_gone_bad_benches_the_worker_not_the_tasks(queue, workers, cli):
    """A MooseFS mount that disappears or turns read-only made every task the worker claimed
    fail "cannot start" at once, retries included: one bad node failed the whole queue within
    minutes. Here the results directory becomes a file under a running worker."""
    w = workers("w1", "--cores", "2")
    wait_for(lambda: queue.workers() and queue.workers()[0]["alive"], 30, "the worker")
    aside = workers.results.with_name("results-aside")
    workers.results.rename(aside)
    workers.results.write_text("not a directory\n")
    ids = submit(queue, ["shell:0:0:1:echo one", "shell:0:0:1:echo two"])
    wait_for(lambda: "cannot start tasks: results directory" in w.output(), 30,
             "the worker to find its results directory unusable")
    wait_for(lambda: queue.workers()[0]["fault"], 30, "the fault in the worker's record")
    assert "w1 cannot start tasks: results directory" in cli("workers", check=True).stdout.decode()
    for tid in ids:
        task = queue.task(tid)
        assert task["state"] != "failed" and task.get("failures", "0") == "0", task
    workers.results.unlink()
    aside.rename(workers.results)
    wait_for(lambda: drained(queue), 60, "the queue to drain once the directory is back")
    assert all(state(queue, tid) == "finished" for tid in ids)
    assert "tasks start again on w1" in w.output()
    wait_for(lambda: not queue.workers()[0]["fault"], 30, "the fault to leave the record")


def test_a_full_results_directory_benches_the_worker_not_the_tasks(queue, workers):
    """On a full disk every task failed writing its output (exit 1, empty tails) and used up its
    retries: the whole queue failed in milliseconds, with nothing saying why. Here the results
    directory is a full 2 MiB tmpfs; the tasks must wait for room, then finish."""
    res = workers.results
    res.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(res)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    w = None
    try:
        with open(res / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 65536)
        w = workers("w1", "--cores", "2")
        ids = submit(queue, ["shell:0:0:1:echo one", "shell:0:0:1:echo two"])
        wait_for(lambda: f"results directory {res}: no space left" in w.output(), 30,
                 "the worker to find its results directory full")
        wait_for(lambda: queue.workers()[0]["fault"], 30, "the fault in the worker's record")
        # Claimed twice more after pauses: the fault lasts, and its pause grows.
        wait_for(lambda: max(int(queue.task(t)["attempt"]) for t in ids) >= 3, 60,
                 "the tasks to be claimed again")
        assert "tasks start again" not in w.output() and queue.workers()[0]["fault"]
        for tid in ids:
            task = queue.task(tid)
            assert task["state"] != "failed" and task.get("failures", "0") == "0", task
        (res / "filler").unlink()
        wait_for(lambda: drained(queue), 90, "the queue to drain once there is room")
        assert all(state(queue, tid) == "finished" for tid in ids)
    finally:
        if w is not None:
            w.kill_everything()
        subprocess.run(["umount", "--lazy", str(res)], check=True)


def test_a_worker_registers_again_after_its_namespace_was_purged(queue, workers, cli):
    """`distcomp purge --yes` under running workers (or a Redis back without its data) took
    their records: the next heartbeat renewed the lease and wrote only the load, so `workers`
    listed none, and an eviction judged every live worker's room as 0 and failed the task."""
    workers("w1", "--cores", "2", "--heartbeat-ttl", "2")
    assert queue.purge() > 0
    wait_for(lambda: [w["name"] for w in queue.workers()] == ["w1"], 30,
             "the worker to register again")
    (row,) = queue.workers()
    assert row["alive"] and row["host"] and row["mem_total"] > 0
    assert "w1" in cli("workers", check=True).stdout.decode()
    (tid,) = submit(queue, ["shell:0:0:1:echo after"])
    wait_for(lambda: state(queue, tid) == "finished", 30, "a task to run")


def test_tasks_without_a_time_limit_get_the_workers_default(queue, workers):
    (tid,) = submit(queue, [json.dumps({"type": "shell", "params": "sleep 60",
                                        "max_retries": 0})])
    workers("w1", "--default-timeout", "0.5")
    wait_for(lambda: state(queue, tid) == "failed", 30, "the default time limit")
    assert queue.task(tid)["reason"] == "timed out after 0.5s (killed)"


def test_a_task_taken_away_is_killed_at_the_next_heartbeat(queue, tmp_path):
    """The queue gave the task back (a requeue of this worker, a lease that expired while it
    was paused): the heartbeat that says so must end the run here, or it would go on beside
    the attempt another worker runs."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="robbed",
                                          kill_grace=1)), queue)
    w.register()
    (tid,) = submit(queue, ["shell:0:0:1:sleep 300"])
    assert w.exchange(True) == 1
    task = w.running[tid]
    assert queue.requeue_worker("robbed", "taken away") == 1
    w.heartbeat()
    assert task.kill_reason == "lost"
    wait_for(lambda: _ended(task.pid), 30, "the task to be killed")


def test_what_a_task_left_in_its_session_dies_when_the_worker_leaves(queue, workers, tmp_path):
    """A task's processes in groups of their own (a script's `set -m` jobs) outlive the task
    and die at the worker's next sample: a worker that left right after the task ended
    (--exit-when-empty, a stop signal) took no sample after it, and they ran on."""
    left = tmp_path / "left"
    (tid,) = submit(queue, [f"shell:0:0:1:set -m; sleep 300 & echo $! > {left}"])
    w = workers("w1", "--exit-when-empty", wait_registered=False)
    assert w.proc.wait(60) == 0, w.output()
    assert state(queue, tid) == "finished"
    pid = int(left.read_text())
    wait_for(lambda: _ended(pid), 30, "what the task left in its session to be killed")


def test_a_worker_with_every_core_taken_in_fractions_still_starts_a_task_needing_none(
        queue, workers, tmp_path):
    """Ten 0.7-core tasks on 7 cores left -8.9e-16 cores free by float sums: the worker saw no
    room and a task that needs no core waited for one of them to end."""
    gate = tmp_path / "gate"
    submit(queue, [f"shell:0:0:0.7:while [ ! -e {gate} ]; do sleep 0.05; done; echo {i}"
                   for i in range(10)])
    workers("w1", "--cores", "7")
    wait_for(lambda: queue.counts()["running"] == 10, 30, "the ten 0.7-core tasks to start")
    (free,) = submit(queue, ["shell:0:0:0:echo free"])
    wait_for(lambda: state(queue, free) == "finished", 30,
             "the task that needs no core to run beside them")
    assert queue.counts()["running"] == 10
    gate.touch()
    wait_for(lambda: drained(queue), 60, "the queue to drain")


def test_the_sweep_of_an_ended_tasks_session_spares_a_task_that_got_its_number(queue, tmp_path):
    """An ended task's session is swept at the next sample by its number, the task's pid; once
    nothing is left in it the number is free, and a task started before that sample can get it
    (pids wrap around): the sweep killed that task, a failure it had not earned. The state
    the wrap-around makes, set up directly: the number to sweep is a running task's pid."""
    from distcomp.worker import Worker

    w = Worker(Config(worker=WorkerConfig(results_dir=str(tmp_path), name="sw")), queue)
    w.sample()
    w.start([Claim("sw", 1, "shell", "sleep 300", "", {}, 0, 0, 1.0, "0")])
    task = w.running["sw"]
    try:
        w.sweep_sids.add(task.pid)
        w.sample()
        assert not _ended(task.pid) and task.pid not in w.sweep_sids
    finally:
        os.killpg(task.pid, signal.SIGKILL)
        os.waitpid(task.pid, 0)
