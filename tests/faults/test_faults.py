"""Fault injection: thousands of short tasks on 3+ real workers while things break on a seeded
random schedule; afterwards nothing is lost and nothing is recorded twice (see invariants.py).

Delays between faults come from the seeded ``rng`` (that is the injection schedule); everything
the tests wait *for* is polled from Redis with a bounded deadline.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import redis
from faultharness import wait_for
from invariants import check, colon_line, json_line

N_TASKS = 2000
SETTLE_S = 300


def short_tasks(cluster, rng, n: int, start: int = 0) -> list[str]:
    log = str(cluster.task_log)
    return [colon_line(log, i, f"sleep 0.{rng.randint(0, 15):02d}")
            for i in range(start, start + n)]


def top_up(cluster, rng) -> None:
    """Keep work queued while faults are still due, so every scheduled fault hits a busy
    cluster however fast the machine is."""
    if cluster.counts().get("todo", 0) < 300:
        cluster.submit_lines(short_tasks(cluster, rng, 500, start=len(cluster.submitted)))


def scrape(cluster, needle: str) -> int:
    return sum(w.log().count(needle) for w in cluster.workers)


class Progress:
    """Time from a moment until the number of recorded outcomes grows again."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster

    def stall_after(self, base: int, timeout: float = 120) -> float:
        t0 = time.monotonic()

        def moved() -> bool:
            try:
                return self.cluster.done() > base
            except redis.ConnectionError:
                return False
        wait_for("progress after the fault", moved, timeout, every=0.01)
        return time.monotonic() - t0


def test_kill9_workers_and_restart(redis_server, cluster_factory, rng, record):
    c = cluster_factory(redis_server, ttl=2.0, worker_args=["--max-tasks", "6"])
    c.submit_lines(short_tasks(c, rng, N_TASKS))
    names = [f"w{i}" for i in range(4)]
    for name in names:
        c.worker(name)
    kills = same_name = new_name = 0
    requeue_times: list[float] = []
    serial = len(names)
    while kills < 12:
        top_up(c, rng)
        time.sleep(rng.uniform(0.3, 1.5))
        alive = [w for w in c.workers if w.alive()]
        victim = rng.choice(alive)
        held = c.r.scard(f"{c.ns}:run:{victim.name}")
        victim.kill9()
        kills += 1
        t0 = time.monotonic()
        if rng.random() < 0.5:
            c.worker(victim.name)
            same_name += 1
        else:
            c.worker(f"w{serial}")
            serial += 1
            new_name += 1
        if held:
            wait_for(f"tasks of killed {victim.name} back in the queue",
                     lambda name=victim.name: c.r.scard(f"{c.ns}:run:{name}") == 0, 30)
            requeue_times.append(time.monotonic() - t0)
    c.wait_settled(SETTLE_S)
    c.stop_workers()
    result = check(c)
    record.update(result, fault="kill -9 worker, restart under same or new name",
                  injected=kills, same_name_restarts=same_name, new_name_restarts=new_name,
                  worst_stall_s=round(max(requeue_times, default=0.0), 3),
                  stall_meaning="kill -9 until the dead worker's tasks are back in todo")
    assert result["finished"] == len(c.submitted)


def test_kill9_redis_and_restart_from_aof(redis_server, cluster_factory, rng, record):
    c = cluster_factory(redis_server, ttl=3.0, worker_args=["--max-tasks", "8"])
    c.submit_lines(short_tasks(c, rng, N_TASKS))
    for i in range(3):
        c.worker(f"w{i}")
    waiter = subprocess.Popen(
        [sys.executable, "-m", "distcomp", "--redis", redis_server.url, "wait", "--json",
         "--timeout", str(SETTLE_S), "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=c.env)
    wait_for("distcomp wait connected to Redis", lambda: any(
        conn.raddr and conn.raddr.port == redis_server.port
        for conn in psutil.Process(waiter.pid).net_connections(kind="tcp")), 60)
    progress = Progress(c)
    stalls, downtimes = [], []
    for _ in range(4):
        time.sleep(rng.uniform(1.0, 3.0))
        top_up(c, rng)
        base = c.done()
        redis_server.kill9()
        down = rng.uniform(0.5, 4.0)
        time.sleep(down)
        downtimes.append(round(down, 2))
        unreachable = c.cli("status", "--json")
        assert unreachable.returncode == 1
        assert b"cannot reach Redis at" in unreachable.stderr
        redis_server.start()
        after_restart = c.done()
        assert after_restart >= base, "the AOF lost acknowledged outcomes"
        stalls.append(round(progress.stall_after(after_restart), 3))
    c.wait_settled(SETTLE_S)
    _, err = waiter.communicate(timeout=60)
    c.stop_workers()
    result = check(c)
    record.update(result, fault="kill -9 redis-server, restart from its AOF on the same port",
                  injected=redis_server.kills, downtimes_s=downtimes, stalls_s=stalls,
                  worst_stall_s=max(stalls, default=0.0),
                  stall_meaning="redis-server back up until the next task outcome is recorded",
                  cli_wait_rc=waiter.returncode, cli_wait_stderr=err.decode()[-500:])
    assert redis_server.kills == 4
    assert waiter.returncode == 0, err.decode()
    assert result["finished"] == len(c.submitted)


def test_sigstop_worker_past_its_lease(redis_server, cluster_factory, rng, record):
    c = cluster_factory(redis_server, ttl=2.0, worker_args=["--max-tasks", "6"])
    c.submit_lines(short_tasks(c, rng, N_TASKS))
    workers = [c.worker(f"w{i}") for i in range(4)]
    stops = 0
    requeue_times = []
    while stops < 6:
        top_up(c, rng)
        time.sleep(rng.uniform(0.5, 2.0))
        victim = rng.choice(workers)
        wait_for(f"{victim.name} running tasks",
                 lambda name=victim.name: c.r.scard(f"{c.ns}:run:{name}") > 0 or c.settled(),
                 30)
        victim.signal(signal.SIGSTOP)
        stops += 1
        t0 = time.monotonic()
        wait_for(f"reaper requeues the tasks of stopped {victim.name}",
                 lambda name=victim.name: c.r.scard(f"{c.ns}:run:{name}") == 0, 30)
        requeue_times.append(time.monotonic() - t0)
        time.sleep(rng.uniform(0.0, 2.0))
        victim.signal(signal.SIGCONT)
    c.wait_settled(SETTLE_S)
    c.stop_workers()
    result = check(c)
    record.update(result, fault="SIGSTOP a worker past its lease (ttl 2s), then SIGCONT",
                  injected=stops, worst_stall_s=round(max(requeue_times, default=0.0), 3),
                  stall_meaning="SIGSTOP until the paused worker's tasks are back in todo",
                  zombie_reports_rejected=scrape(c, "rejected: the task was taken over"),
                  zombie_tasks_killed=scrape(c, "was taken away from this worker"))
    assert result["finished"] == len(c.submitted)


def test_network_cut_between_worker_and_redis(redis_server, cluster_factory, proxy_factory,
                                              rng, record):
    c = cluster_factory(redis_server, ttl=2.0, worker_args=["--max-tasks", "6"])
    c.submit_lines(short_tasks(c, rng, N_TASKS))
    for i in range(2):
        c.worker(f"w{i}")
    proxies = {f"cut{i}": proxy_factory(redis_server.port) for i in range(2)}
    for name, proxy in proxies.items():
        c.worker(name, url=proxy.url)
    cuts = silent_cuts = 0
    stalls = []
    while cuts < 8:
        top_up(c, rng)
        time.sleep(rng.uniform(0.5, 2.0))
        name = rng.choice(sorted(proxies))
        proxy = proxies[name]
        silent = rng.random() < 0.5
        proxy.cut(silent=silent)
        cuts += 1
        silent_cuts += silent
        time.sleep(rng.uniform(0.5, 5.0))
        hb_before = float(c.r.hget(f"{c.ns}:w:{name}", "hb") or 0)
        proxy.restore()
        t0 = time.monotonic()
        wait_for(f"{name} heartbeats again after the cut",
                 lambda name=name, before=hb_before:
                 float(c.r.hget(f"{c.ns}:w:{name}", "hb") or 0) > before, 120)
        stalls.append(round(time.monotonic() - t0, 3))
    c.wait_settled(SETTLE_S)
    c.stop_workers()
    result = check(c)
    record.update(result, fault="network cut between a worker and Redis (TCP proxy; resets "
                  "and silent drops), restored", injected=cuts, silent_cuts=silent_cuts,
                  stalls_s=stalls, worst_stall_s=max(stalls, default=0.0),
                  stall_meaning="link restored until the cut worker's next heartbeat lands",
                  zombie_reports_rejected=scrape(c, "rejected: the task was taken over"))
    assert result["finished"] == len(c.submitted)


def test_misbehaving_tasks(redis_server, cluster_factory, rng, record, tmp_path):
    c = cluster_factory(redis_server, ttl=3.0,
                        worker_args=["--max-tasks", "8", "--memory-limit", "600M",
                                     "--kill-grace", "1"])
    log = str(c.task_log)
    hog = (f"{sys.executable} -c 'import time\nb=[]\nfor _ in range(100):\n"
           f"    b.append(bytearray(20<<20)); time.sleep(0.05)'")
    kinds = {
        "fail": ("(exit $((RANDOM % 2 * 3)))", {"max_retries": 1}),
        "timeout": ("sleep 60", {"timeout_s": 1}),
        "orphan": ("sleep 300 & sleep 0.05", {}),
        "newgroup": ((f"{sys.executable} -c 'import os,time\nif os.fork()==0:\n"
                      f"    os.setpgid(0,0); time.sleep(300)' ; sleep 0.05"), {}),
        "noterm": ("trap '' TERM; sleep 60", {"timeout_s": 1}),
        "flood": ("head -c 30000000 /dev/zero | tr '\\0' x; echo", {}),
        "signal": ("kill -SEGV $$", {"max_retries": 0}),
        "hog": (hog, {"max_retries": 0}),
    }
    weights = {"fail": 60, "timeout": 10, "orphan": 20, "newgroup": 10, "noterm": 5,
               "flood": 5, "signal": 10, "hog": 4}
    lines, kind_of = [], {}
    n = 0
    for kind, count in weights.items():
        payload, fields = kinds[kind]
        for _ in range(count):
            lines.append(json_line(log, n, payload, **fields))
            kind_of[n] = kind
            n += 1
    lines += short_tasks(c, rng, 1500, start=n)
    rng.shuffle(lines)
    c.submit_lines(lines)
    workers = [c.worker(f"w{i}") for i in range(3)]
    c.wait_settled(SETTLE_S)
    assert all(w.alive() for w in workers), "a misbehaving task took a worker down"
    worker_pids = {w.pid for w in workers}
    wait_for("no process of a task left behind",
             lambda: not set(c.tagged_pids()) - worker_pids, 20, every=0.2)
    c.stop_workers()
    result = check(c)
    reasons: dict[str, int] = {}
    for tid in c.r.zrange(f"{c.ns}:s:failed", 0, -1):
        reason = (c.r.hget(f"{c.ns}:t:{tid.decode()}", "reason") or b"").decode()
        key = reason.split(":")[0].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    record.update(result, fault="misbehaving tasks (fail, timeout, orphans, ignore TERM, "
                  "flood stdout, signal, memory hog)", injected=sum(weights.values()),
                  per_kind=weights, failure_reasons=reasons,
                  evictions=scrape(c, "memory short"), worst_stall_s=None)
    assert result["failed"] >= weights["timeout"] + weights["noterm"] + weights["signal"]


def test_evicted_memory_hog_is_not_stranded_in_todo(redis_server, cluster_factory, record):
    """A task evicted next to others records its peak as its memory need; a peak above what
    any worker offers (capacity - reserve) must fail it with a reason, not strand it in todo
    (regression test for bc653b1)."""
    c = cluster_factory(redis_server, ttl=3.0,
                        worker_args=["--max-tasks", "4", "--memory-limit", "600M",
                                     "--kill-grace", "1"])
    log = str(c.task_log)
    hog = (f"{sys.executable} -c 'import time\nb=[]\nfor _ in range(200):\n"
           f"    b.append(bytearray(20<<20)); time.sleep(0.02)'")
    lines = [json_line(log, i, "sleep 3", priority=10) for i in range(3)]
    lines.append(json_line(log, 3, hog, priority=0))
    c.submit_lines(lines)
    c.worker("w0")
    c.wait_settled(90)
    c.stop_workers()
    result = check(c)
    hog_id = next(tid for tid, params in c.submitted.items() if "bytearray" in params)
    task = {k.decode(): v.decode() for k, v in c.r.hgetall(f"{c.ns}:t:{hog_id}").items()}
    record.update(result, fault="memory hog evicted while other tasks run", injected=1,
                  hog_evictions=int(task["evictions"]), hog_reason=task["reason"],
                  worst_stall_s=None)
    assert task["state"] == "failed"
    # Evicted next to others: "needs N MiB ..., more than any live worker has room for";
    # evicted once it runs alone: "needs more memory than node w0 has: peak ...". Either way
    # it fails with its memory need, never waits in todo.
    assert task["reason"].startswith("needs "), task["reason"]
    assert "MiB" in task["reason"], task["reason"]


def test_lost_replies_leave_no_task_stuck_running(redis_server, cluster_factory, proxy_factory,
                                                  rng, record):
    """Commands that ran in Redis but whose replies never reached the worker: a claim among
    them hands the worker tasks it never hears of."""
    c = cluster_factory(redis_server, ttl=3.0, worker_args=["--max-tasks", "6"])
    c.submit_lines(short_tasks(c, rng, 1000))
    proxies = {f"lossy{i}": proxy_factory(redis_server.port) for i in range(2)}
    c.worker("w0")
    for name, proxy in proxies.items():
        c.worker(name, url=proxy.url)
    losses = 0
    while losses < 30:
        top_up(c, rng)
        time.sleep(rng.uniform(0.1, 0.5))
        proxy = proxies[rng.choice(sorted(proxies))]
        proxy.lose_replies(rng.uniform(0.05, 0.3))
        losses += 1
        time.sleep(rng.uniform(0.1, 0.5))
        proxy.restore()
    c.wait_settled(120)
    c.stop_workers()
    result = check(c)
    record.update(result, fault="replies lost after Redis ran the command (proxy drops "
                  "answers, then resets)", injected=losses, worst_stall_s=None)


def test_claim_whose_reply_was_lost_does_not_strand_tasks(redis_server, cluster_factory, rng,
                                                          record):
    """A claim can run in Redis and its reply never reach the worker (connection reset after
    the script ran; the client then re-sends it). The queue then lists tasks as running on a live
    worker that never started them. Here the lost claim is replayed exactly: the same script,
    with the worker's own name and lease token, its reply thrown away."""
    from distcomp.queue import Queue
    from distcomp.redis_client import Redis

    c = cluster_factory(redis_server, ttl=2.0, worker_args=["--max-tasks", "4"])
    c.submit_lines(short_tasks(c, rng, 200))
    w = c.worker("w0")
    token = wait_for("w0's lease", lambda: c.r.get(f"{c.ns}:lease:w0"), 30).decode()
    ghosts = Queue(Redis(redis_server.url), c.ns).claim("w0", token, 1024, 4, 3)
    assert ghosts and len(ghosts) == 3
    c.wait_settled(60)
    assert w.alive()
    c.stop_workers()
    result = check(c)
    record.update(result, fault="claim ran in Redis, reply lost", injected=len(ghosts),
                  worst_stall_s=None)
