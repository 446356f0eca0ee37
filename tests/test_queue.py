"""The Redis data model, exercised through the real Lua scripts on a real redis-server."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest
import redis

from distcomp import queue as queue_module
from distcomp.queue import Queue
from distcomp.redis_client import Redis, ResponseError
from distcomp.spec import TaskSpec, parse_line
from tests.conftest import RedisServer
from tests.helpers import ReplyLoser, wait_for


def spec(params: str, priority: int = 0, mem_gb: float = 0, cpu: float = 1,
         retries: int = 3) -> TaskSpec:
    return TaskSpec("shell", priority, mem_gb, cpu, params, max_retries=retries)


def register(queue: Queue, name: str, ttl_ms: int = 60_000, room_mb: int = 8192) -> str:
    token = f"tok-{name}"
    ok, _ = queue.register(name, token, ttl_ms, {"host": "test", "pid": 1, "room_mb": room_mb})
    assert ok
    return token


def claim_one(queue: Queue, name: str, mem: float = 1e9, cpu: float = 1e9):
    claims = queue.claim(name, f"tok-{name}", mem, cpu, 1)
    return claims[0] if claims else None


def test_submit_is_idempotent_and_counts_are_exact(queue):
    specs = [spec(f"echo {i}") for i in range(250)]
    assert queue.submit(specs) == (250, 0, 0)
    assert queue.submit(specs + [spec("echo new")]) == (1, 250, 0)
    assert queue.counts() == {"todo": 251, "running": 0, "finished": 0, "failed": 0,
                              "total": 251}


def test_tasks_repeated_in_one_submission_are_stored_once(queue):
    """Ids are worked out chunk by chunk while Redis stores the previous chunk, so a repeat
    can sit several chunks after its first appearance."""
    specs = [spec(f"echo {i}") for i in range(2500)]
    repeated = specs + [spec("echo 3"), spec("echo 2499"), spec("echo 2499")]
    assert queue.submit(repeated) == (2500, 0, 3)
    assert queue.counts()["todo"] == 2500


def test_priority_is_exact_and_fifo_within_a_priority(queue):
    rng = random.Random(7)
    specs = [spec(f"echo {i}", priority=rng.randint(-5, 5)) for i in range(3000)]
    queue.submit(specs)
    register(queue, "w")
    order = []
    while (c := claim_one(queue, "w")) is not None:
        order.append(c.task_id)
    expected = [s.task_id for s in sorted(specs, key=lambda s: -s.priority)]  # stable: FIFO
    assert order == expected


def test_claim_takes_the_best_task_that_fits(queue):
    big = spec("big", priority=9, mem_gb=4)
    wide = spec("wide", priority=8, cpu=8)
    small = spec("small", priority=1, mem_gb=0.5, cpu=1)
    queue.submit([big, wide, small])
    register(queue, "w")
    c = claim_one(queue, "w", mem=2048, cpu=4)
    assert c.task_id == small.task_id and c.mem_mb == 512
    assert claim_one(queue, "w", mem=2048, cpu=4) is None
    assert claim_one(queue, "w", mem=8192, cpu=4).task_id == big.task_id
    assert claim_one(queue, "w", mem=8192, cpu=8).task_id == wide.task_id


def test_claim_charges_what_the_worker_learned_for_a_declared_size(queue):
    """A worker that saw undeclared tasks peak at 3000 MiB charges the next one that much; a
    task that declared a size nobody else declared is charged its declaration, and an evicted
    task at least its peak."""
    undeclared, declared = spec("undeclared", priority=2), spec("declared", mem_gb=1)
    queue.submit([undeclared, declared])
    register(queue, "w")
    learned = {"0.0": 3000.0}
    c = queue.claim("w", "tok-w", 2048, 4, 5, charges=learned)
    assert [(x.task_id, x.mem_mb, x.declared) for x in c] == [(declared.task_id, 1024, "1.0")]
    c = queue.claim("w", "tok-w", 3000, 4, 5, charges=learned)
    assert [(x.task_id, x.declared) for x in c] == [(undeclared.task_id, "0.0")]
    assert queue.evict(undeclared.task_id, "w", 1, 3500, 5, "evicted", "budget", {}) == 2
    assert queue.claim("w", "tok-w", 3400, 4, 5, charges=learned) == []
    assert queue.claim("w", "tok-w", 3500, 4, 5, charges=learned)[0].mem_mb == 3500


def test_batch_claim_stops_when_resources_run_out(queue):
    queue.submit([spec(f"t{i}", mem_gb=1, cpu=1) for i in range(10)])
    register(queue, "w")
    claims = queue.claim("w", "tok-w", 3.5 * 1024, 16, 64)
    assert len(claims) == 3
    assert queue.counts()["running"] == 3


def test_claim_cost_does_not_scan_the_queue(queue, client):
    """Tasks that cannot fit sit in their own bucket; claims never walk past them."""
    queue.submit([spec(f"huge {i}", priority=5, mem_gb=512) for i in range(5000)])
    queue.submit([spec("fits", priority=0, mem_gb=1)])
    register(queue, "w")
    info_before = client.info("commandstats").get("cmdstat_zrange", {}).get("calls", 0)
    assert claim_one(queue, "w", mem=4096, cpu=4).params == "fits"
    calls = client.info("commandstats").get("cmdstat_zrange", {}).get("calls", 0) - info_before
    assert calls <= 2


def test_concurrent_claimers_never_double_claim(redis_server, namespace):
    base = Queue(Redis(redis_server.url), namespace)
    base.submit([spec(f"echo {i}", cpu=0) for i in range(2000)])
    got: dict[str, list[str]] = {}

    def claimer(name: str) -> None:
        q = Queue(Redis(redis_server.url), namespace)
        register(q, name)
        mine = got.setdefault(name, [])
        while claims := q.claim(name, f"tok-{name}", 1e9, 1e9, 7):
            mine += [c.task_id for c in claims]

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [tid for ids in got.values() for tid in ids]
    assert len(all_ids) == 2000 and len(set(all_ids)) == 2000
    assert sum(1 for ids in got.values() if ids) > 1
    assert base.counts()["running"] == 2000


def taken_over(queue, client, first_worker: str, second_worker: str):
    """Queue one task; its first attempt, on ``first_worker``, is requeued when that worker's
    lease expires, and ``second_worker`` claims it again. Returns the task and both claims."""
    s = spec("work")
    queue.submit([s])
    register(queue, first_worker, ttl_ms=100)
    first = claim_one(queue, first_worker)
    wait_for(lambda: not client.exists(queue.key("lease", first_worker)), 5, "lease expiry")
    assert queue.reap().requeued == 1
    register(queue, second_worker)
    return s, first, claim_one(queue, second_worker)


def test_late_result_of_a_taken_over_attempt_is_rejected(queue, client):
    s, first, second = taken_over(queue, client, "w1", "w2")
    assert first.attempt == 1
    assert second.task_id == s.task_id and second.attempt == 2
    assert queue.finish(s.task_id, "w1", 1, {"exit_code": 0}) == 0
    assert queue.finish(s.task_id, "w2", 2, {"exit_code": 0}) == 1
    # A re-sent report (lost reply) gets the same answer and changes nothing.
    assert queue.finish(s.task_id, "w2", 2, {"exit_code": 0}) == 1
    assert queue.counts()["finished"] == 1 and queue.counts()["running"] == 0
    assert client.zcard(queue.key("s", "finished")) == 1


def test_a_late_report_is_rejected_when_another_workers_name_extends_the_reporters(queue,
                                                                                 client):
    """Reports are marked worker#attempt#outcome: attempt 1 of worker 'a' once read the mark
    'a#1#2#1' of worker 'a#1' as its own and got no answer instead of a rejection."""
    s, first, second = taken_over(queue, client, "a", "a#1")
    assert queue.finish(s.task_id, "a#1", second.attempt, {"exit_code": 0}) == 1
    assert queue.finish(s.task_id, "a", first.attempt, {"exit_code": 0}) == 0
    assert queue.fail(s.task_id, "a", first.attempt, {"reason": "exit 1"}, True) == 0
    assert queue.requeue(s.task_id, "a", first.attempt, "stopping") == 0
    assert queue.task(s.task_id)["reported"] == "a#1#2#1"


def failed_on_w1(queue) -> TaskSpec:
    """A task that worker w1 failed once, retryable, with w2 alive beside it."""
    s = spec("flaky", retries=3)
    queue.submit([s])
    register(queue, "w1")
    register(queue, "w2")
    c = claim_one(queue, "w1")
    assert queue.fail(c.task_id, "w1", c.attempt, {"reason": "exit code 1"}, True) == 2
    return s


@pytest.mark.parametrize("ahead_s", [0, 120])
def test_failure_retries_prefer_another_live_worker(queue, monkeypatch, ahead_s):
    """Whatever the workers' clocks say: the failure was stamped with the failing worker's
    clock and compared with the claiming worker's, so one whose clock ran a minute ahead took
    its own failure straight back. Both are Redis's clock now."""
    s = failed_on_w1(queue)
    ahead = time.time() + ahead_s
    monkeypatch.setattr("distcomp.queue.time.time", lambda: ahead)
    assert claim_one(queue, "w1") is None, "w1 must leave the retry to w2"
    c2 = claim_one(queue, "w2")
    assert c2.task_id == s.task_id and c2.attempt == 2


@pytest.mark.parametrize(("room_mb", "cores", "left_to_w2"), [
    (8192, 64, True), (1024, 64, False), (8192, 1, False)])
def test_a_retry_is_left_only_to_a_worker_that_could_run_it(queue, room_mb, cores, left_to_w2):
    """w1 failed a task of 2 GiB and 2 cores; the only other live worker, w2, is too small for
    it. w1 left the retry to w2 for the whole avoid window all the same, and it waited a
    minute."""
    s = TaskSpec("shell", 0, 2, 2, "flaky", max_retries=3)
    queue.submit([s])
    register(queue, "w1")
    queue.register("w2", "tok-w2", 60_000, {"host": "test", "pid": 1, "room_mb": room_mb,
                                            "cores": cores})
    c = claim_one(queue, "w1")
    assert queue.fail(c.task_id, "w1", c.attempt, {"reason": "exit code 1"}, True) == 2
    again = claim_one(queue, "w1")
    assert (again is None) == left_to_w2, again


def _params(claims) -> list[str]:
    return [c.params for c in claims]


def _done(queue: Queue, name: str, *claims) -> None:
    for c in claims:
        assert queue.finish(c.task_id, name, c.attempt, {"exit_code": 0}) == 1


def test_a_large_task_passed_over_gets_a_worker_that_waits_for_room_for_it(queue, client,
                                                                           monkeypatch):
    """w1 (room 1000 MiB) runs three 256 MiB tasks; a 768 MiB one queued after them fits only
    once they have ended, and each claim took the next small task over it, for as long as
    small tasks came (to the end of the bag). Passed over for longer than
    CLAIM_RESERVE_AFTER_S (none here), w1 reserves it and takes nothing worse until it has the
    room; w2 goes on taking what fits it."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    small = [spec(f"small {i}", mem_gb=0.25) for i in range(8)]
    big = spec("big", mem_gb=0.75)
    queue.submit([*small[:3], big, *small[3:]])
    register(queue, "w1", room_mb=1000)
    register(queue, "w2", room_mb=500)
    first = queue.claim("w1", "tok-w1", 1000, 8, 3)
    assert _params(first) == ["small 0", "small 1", "small 2"]
    _done(queue, "w1", first[0])
    passed = queue.claim("w1", "tok-w1", 488, 8, 1)
    assert _params(passed) == ["small 3"]  # the first pass over it is when it began
    assert client.hget(queue.key("t", big.task_id), "passed_since") is not None
    _done(queue, "w1", first[1])
    assert queue.claim("w1", "tok-w1", 488, 8, 1) == []
    assert client.hget(queue.key("t", big.task_id), "reserved_by") == b"w1"
    assert _params(queue.claim("w2", "tok-w2", 500, 8, 1)) == ["small 4"]
    _done(queue, "w1", first[2], *passed)
    assert _params(queue.claim("w1", "tok-w1", 1000, 8, 3)) == ["big"]
    assert client.hmget(queue.key("t", big.task_id), "passed_since", "reserved_by") == \
        [None, None]


def _reserved(queue: Queue, client, name: str = "w1", drained_s: float | None = None):
    """Small tasks (256 MiB) around a big one (768) that ``name`` (room 1000 MiB) reserves
    after passing it over twice, with two small tasks running; returns (big, running)."""
    small = [spec(f"small {i}", mem_gb=0.25) for i in range(6)]
    big = spec("big", mem_gb=0.75)
    queue.submit([small[0], big, *small[1:]])
    register(queue, name, room_mb=1000)
    token = f"tok-{name}"
    running = [*queue.claim(name, token, 300, 8, 1), *queue.claim(name, token, 300, 8, 1)]
    assert _params(running) == ["small 0", "small 1"]
    assert queue.claim(name, token, 300, 8, 1) == []
    assert client.hget(queue.key("t", big.task_id), "reserved_by") == name.encode()
    return big, running


def test_a_reservation_outlives_the_first_claim_after_the_worker_drained(queue, client,
                                                                         monkeypatch):
    """The first claim after a worker's last task ended may see memory measured while that task
    still held it: giving the reservation up there threw away the wait and the drain."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    _, running = _reserved(queue, client)
    _done(queue, "w1", *running)
    assert queue.claim("w1", "tok-w1", 600, 8, 1) == []
    assert _params(queue.claim("w1", "tok-w1", 1000, 8, 2)) == ["big"]
    assert client.hget(queue.key("w", "w1"), "reserving") is None


def test_a_reservation_is_given_up_when_its_worker_has_drained_and_still_lacks_room(
        queue, client, monkeypatch):
    """Memory the node uses for other things can keep a task that fits a worker's registered
    room from fitting what it has free even with nothing running: waiting on would idle it,
    and so would reserving any other task of that size."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    monkeypatch.setattr(queue_module, "CLAIM_DRAINED_S", 0.0)
    _, running = _reserved(queue, client)
    _done(queue, "w1", *running)
    assert queue.claim("w1", "tok-w1", 600, 8, 1) == []  # drained: once may be a stale reading
    assert _params(queue.claim("w1", "tok-w1", 600, 8, 1)) == ["small 2"]
    # Nor does it reserve a task that large again, to idle once more: 600 MiB is what it has.
    assert client.hget(queue.key("w", "w1"), "no_room_mb") == b"600"
    queue.submit([spec("big too", mem_gb=0.7)])
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 3"]
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 4"]
    assert client.hget(queue.key("w", "w1"), "reserving") is None


def test_a_better_task_that_does_not_fit_leaves_the_reservation_in_force(queue, client,
                                                                         monkeypatch):
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    _reserved(queue, client)
    queue.submit([spec("urgent", priority=5, mem_gb=0.75)])
    assert queue.claim("w1", "tok-w1", 300, 8, 1) == []


def test_cancel_and_retry_clear_a_reservation(queue, client, monkeypatch):
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    big, _ = _reserved(queue, client)
    assert queue.cancel([big.task_id])[0] == 1
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 2"]
    assert client.hget(queue.key("w", "w1"), "reserving") is None
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 300.0)
    assert queue.retry([big.task_id]) == 1
    assert client.hmget(queue.key("t", big.task_id), "passed_since", "reserved_by") == \
        [None, None]
    # Passed over again, it starts its wait anew.
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 3"]
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 4"]


def test_a_reserved_task_is_taken_once_it_fits_wherever_it_is_in_its_bucket(queue, client,
                                                                           monkeypatch):
    """Tasks of its bucket that no worker here can run, ahead of it, fill the claim's
    look-ahead: the reserved task, never read, kept the worker from taking anything at all."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    _, running = _reserved(queue, client)
    queue.submit([spec(f"huge {i}", priority=5, mem_gb=0.99)
                  for i in range(queue_module.CLAIM_LOOKAHEAD)])
    _done(queue, "w1", *running)
    assert _params(queue.claim("w1", "tok-w1", 1000, 8, 2)) == ["big"]


def test_a_reservation_of_a_worker_that_stopped_claiming_is_taken_over(queue, client,
                                                                       monkeypatch):
    """A worker draining for a stop, or paused by a fault, claims nothing while its lease
    lives: its reservation held the task back from every other worker as long as that."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    big, _ = _reserved(queue, client)
    register(queue, "w2", room_mb=1000)
    w2 = [*queue.claim("w2", "tok-w2", 300, 8, 1), *queue.claim("w2", "tok-w2", 300, 8, 1)]
    assert _params(w2) == ["small 2", "small 3"]  # w1 holds it: it claimed just now
    monkeypatch.setattr(queue_module, "RESERVATION_FRESH_S", 0.0)
    assert queue.claim("w2", "tok-w2", 300, 8, 1) == []
    assert client.hget(queue.key("t", big.task_id), "reserved_by") == b"w2"
    # Stopped, w2 no longer holds it: `show` names no worker that is gone.
    assert queue.deregister("w2", "tok-w2", {}) == 2
    assert client.hget(queue.key("t", big.task_id), "reserved_by") is None


def test_a_task_that_cannot_be_reserved_does_not_hide_the_next_of_its_bucket(queue, client,
                                                                              monkeypatch):
    """w1 gave up a 973 MiB task: with nothing running it had 900 MiB. A 614 MiB task queued
    behind it, in the same bucket, must still get its reservation."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    monkeypatch.setattr(queue_module, "CLAIM_DRAINED_S", 0.0)
    small = [spec(f"small {i}", mem_gb=0.25) for i in range(6)]
    queue.submit([small[0], spec("too big", priority=2, mem_gb=0.95), *small[1:]])
    register(queue, "w1", room_mb=1000)
    running = queue.claim("w1", "tok-w1", 300, 8, 1)
    assert _params(running) == ["small 0"]
    assert queue.claim("w1", "tok-w1", 300, 8, 1) == []
    _done(queue, "w1", *running)
    assert queue.claim("w1", "tok-w1", 900, 8, 1) == []
    assert _params(queue.claim("w1", "tok-w1", 900, 8, 1)) == ["small 1"]  # given up
    fits = spec("fits", priority=1, mem_gb=0.6)  # behind it in its bucket, before the rest
    queue.submit([fits])
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 2"]
    assert queue.claim("w1", "tok-w1", 300, 8, 1) == []
    assert client.hget(queue.key("t", fits.task_id), "reserved_by") == b"w1"


def test_a_task_another_worker_holds_does_not_hide_the_next_large_one(queue, client,
                                                                     monkeypatch):
    """w1 holds X reserved; w2 found X its head, left it to w1 and stopped looking: Y, as large,
    was not even marked passed over until w1 had taken X, so large tasks waited one by one."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    small = [spec(f"small {i}", mem_gb=0.25) for i in range(8)]
    x, y = spec("x", mem_gb=0.75), spec("y", mem_gb=0.75)
    queue.submit([small[0], x, y, *small[1:]])
    register(queue, "w1", room_mb=1000)
    register(queue, "w2", room_mb=1000)
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 0"]
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 1"]
    assert queue.claim("w1", "tok-w1", 300, 8, 1) == []
    assert _params(queue.claim("w2", "tok-w2", 300, 8, 1)) == ["small 2"]
    assert queue.claim("w2", "tok-w2", 300, 8, 1) == []
    assert [client.hget(queue.key("t", t.task_id), "reserved_by") for t in (x, y)] == \
        [b"w1", b"w2"]


def test_a_reservation_held_too_long_without_the_task_is_taken_over(queue, client,
                                                                    monkeypatch):
    """A worker kept busy by better tasks keeps claiming, so it looks alive to the others, yet
    never has the room: after RESERVATION_HOLD_S another worker may take the task over."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    big, _ = _reserved(queue, client)
    register(queue, "w2", room_mb=1000)
    assert _params(queue.claim("w2", "tok-w2", 300, 8, 1)) == ["small 2"]
    assert _params(queue.claim("w2", "tok-w2", 300, 8, 1)) == ["small 3"]  # w1 holds it
    monkeypatch.setattr(queue_module, "RESERVATION_HOLD_S", 0.0)
    assert queue.claim("w2", "tok-w2", 300, 8, 1) == []
    assert client.hget(queue.key("t", big.task_id), "reserved_by") == b"w2"


def test_the_room_a_drained_worker_had_is_forgotten_once_it_has_more(queue, client,
                                                                     monkeypatch):
    """A dip of free memory while the worker was drained would otherwise stop it reserving
    anything as large for as long as it runs."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    monkeypatch.setattr(queue_module, "CLAIM_DRAINED_S", 0.0)
    _, running = _reserved(queue, client)
    _done(queue, "w1", *running)
    assert queue.claim("w1", "tok-w1", 600, 8, 1) == []
    again = queue.claim("w1", "tok-w1", 600, 8, 1)
    assert _params(again) == ["small 2"]
    assert client.hget(queue.key("w", "w1"), "no_room_mb") == b"600"
    _done(queue, "w1", *again)
    assert _params(queue.claim("w1", "tok-w1", 900, 8, 1)) == ["big"]
    assert client.hget(queue.key("w", "w1"), "no_room_mb") is None


def test_a_task_is_reserved_by_its_real_size_not_its_scaled_charge(queue, client, monkeypatch):
    """Beside forecast tasks a class is charged less than its size (the room its growth finds):
    a worker reserved, and drained for, a task larger than its whole room."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    small = [spec(f"small {i}", mem_gb=0.25) for i in range(5)]
    queue.submit([small[0], spec("grows", mem_gb=0.5), *small[1:]])
    register(queue, "w1", room_mb=1000)
    got = []
    for _ in range(4):
        got += queue.claim("w1", "tok-w1", 300, 8, 1, charges={"0.5": 600.0},
                           sizes={"0.5": 1100.0})
    assert _params(got) == ["small 0", "small 1", "small 2", "small 3"]
    assert client.hget(queue.key("w", "w1"), "reserving") is None


def test_a_reservation_its_live_worker_no_longer_holds_is_taken_over(queue, client,
                                                                     monkeypatch):
    """w1 registers again, smaller: it can no longer run the task it reserved, and drops the
    reservation; w2, which can, reserves it when it passes it over."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    big, _ = _reserved(queue, client)
    register(queue, "w1", room_mb=500)
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 2"]
    register(queue, "w2", room_mb=1000)
    assert _params(queue.claim("w2", "tok-w2", 300, 8, 1)) == ["small 3"]
    assert queue.claim("w2", "tok-w2", 300, 8, 1) == []
    assert client.hget(queue.key("t", big.task_id), "reserved_by") == b"w2"


def test_a_reservation_whose_worker_is_gone_is_taken_over(queue, client, monkeypatch):
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    small = [spec(f"small {i}", mem_gb=0.25) for i in range(8)]
    big = spec("big", mem_gb=0.75)
    queue.submit([*small[:2], big, *small[2:]])
    register(queue, "w1", ttl_ms=100, room_mb=1000)
    register(queue, "w2", room_mb=1000)
    assert _params(queue.claim("w1", "tok-w1", 600, 8, 3)) == ["small 0", "small 1"]
    assert _params(queue.claim("w1", "tok-w1", 300, 8, 1)) == ["small 2"]
    assert queue.claim("w1", "tok-w1", 300, 8, 1) == []
    key = queue.key("t", big.task_id)
    assert client.hget(key, "reserved_by") == b"w1"
    wait_for(lambda: not client.exists(queue.key("lease", "w1")), 5, "w1's lease to expire")
    assert _params(queue.claim("w2", "tok-w2", 300, 8, 1)) == ["small 3"]  # w2 ran nothing
    assert queue.claim("w2", "tok-w2", 300, 8, 1) == []
    assert client.hget(key, "reserved_by") == b"w2"


def test_tasks_a_worker_failed_do_not_hide_the_rest_of_their_bucket_from_it(queue, client):
    """A retried task goes back to the head of its bucket; a claim looks 16 tasks deep. The 16
    tasks w1 just failed, which it leaves to w2 for a while, once used up all of it, and w1
    claimed nothing although 84 tasks that never failed waited behind them. The claim reads
    them once, not once for each task it takes (Redis counts the task reads)."""
    specs = [spec(f"job {i}") for i in range(100)]
    queue.submit(specs)
    register(queue, "w1")
    register(queue, "w2")
    first = queue.claim("w1", "tok-w1", 1e6, 16, 16)
    for c in first:
        assert queue.fail(c.task_id, "w1", c.attempt, {"reason": "exit 1"}, True) == 2
    before = client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)
    again = queue.claim("w1", "tok-w1", 1e6, 16, 16)
    reads = client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0) - before
    assert [c.task_id for c in again] == [s.task_id for s in specs[16:32]]
    # and, once each, w2's size (whether it could run them) and w1's (what it could run)
    assert reads == 16 + 16 + 2
    assert [c.task_id for c in queue.claim("w2", "tok-w2", 1e6, 16, 16)] == [
        c.task_id for c in first]


def test_failure_retry_falls_back_to_the_same_worker_when_alone(queue):
    s = spec("flaky", retries=1)
    queue.submit([s])
    register(queue, "solo")
    c = claim_one(queue, "solo")
    assert queue.fail(c.task_id, "solo", c.attempt, {"reason": "exit code 1"}, True) == 2
    c = claim_one(queue, "solo")
    assert c is not None and c.attempt == 2
    assert queue.fail(c.task_id, "solo", c.attempt, {"reason": "exit code 1"}, True) == 1
    task = queue.task(s.task_id)
    assert task["state"] == "failed" and task["failures"] == "2"
    assert queue.counts()["failed"] == 1


def test_eviction_budget_and_peak_memory_placement(queue):
    s = spec("grows")
    queue.submit([s])
    register(queue, "w")
    for n in range(1, 3):
        c = claim_one(queue, "w")
        assert c.attempt == n
        assert queue.evict(c.task_id, "w", c.attempt, 3000, 2, "evicted", "budget", {}) == 2
    assert claim_one(queue, "w", mem=2048) is None, "needs its observed peak of 3000 MiB"
    c = claim_one(queue, "w", mem=4096)
    assert c.mem_mb == 3000
    assert queue.evict(c.task_id, "w", c.attempt, 3000, 2, "evicted", "over budget", {}) == 1
    task = queue.task(s.task_id)
    assert task["state"] == "failed" and task["reason"] == "over budget"
    assert task["evictions"] == "3" and "failures" not in task


def test_lease_expiry_requeues_without_a_command(queue, client):
    queue.submit([spec("a"), spec("b")])
    register(queue, "w", ttl_ms=150)
    assert len(queue.claim("w", "tok-w", 1e9, 1e9, 5)) == 2
    assert queue.reap().requeued == 0
    wait_for(lambda: not client.exists(queue.key("lease", "w")), 5, "lease expiry")
    assert queue.reap().requeued == 2
    assert queue.counts()["todo"] == 2 and queue.running_on("w") == set()


def test_the_reaper_hands_back_every_task_of_a_dead_worker_that_ran_thousands(queue, client):
    """Lua unpacks at most about 8,000 values at once: the dead worker's chores (two values a
    task) once went to Redis in one HSET, which failed after its lease was dropped, so its tasks
    stayed running for ever and the live worker whose reap it was got an error."""
    specs = [spec(f"t{i}", cpu=0) for i in range(4100)]
    queue.submit(specs)
    ok, _ = queue.register("big", "tok-big", 100, {"host": "h1", "results_dir": "/shared"})
    assert ok and len(queue.claim("big", "tok-big", 1e9, 1e9, 5000)) == 4100
    wait_for(lambda: not client.exists(queue.key("lease", "big")), 5, "lease expiry")
    assert queue.reap().requeued == 4100
    assert queue.counts()["todo"] == 4100 and queue.running_on("big") == set()
    assert client.zscore(queue.key("leases"), "big") is None
    drop = queue.reap("/shared").drop
    assert sorted(drop) == sorted((s.task_id, 1) for s in specs)
    held_in_step(queue, client)


def test_a_reap_that_fails_half_way_is_done_again_by_the_next(queue, client):
    """Redis does not undo a script that fails half-way: the dead worker must still be listed
    for the next reap, which hands its tasks back."""
    queue.submit([spec("a"), spec("b")])
    ok, _ = queue.register("w", "tok-w", 100, {"host": "h1", "results_dir": "/shared"})
    assert ok and len(queue.claim("w", "tok-w", 1e9, 1e9, 5)) == 2
    wait_for(lambda: not client.exists(queue.key("lease", "w")), 5, "lease expiry")
    client.set(queue.key("left", "w"), "not a hash")  # its chores cannot be written down
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        queue.reap()
    client.delete(queue.key("left", "w"))
    assert queue.reap().requeued == 2
    assert queue.counts()["todo"] == 2 and queue.running_on("w") == set()


def test_cancel_and_retry(queue):
    a, b, c = spec("a"), spec("b"), spec("c")
    queue.submit([a, b, c])
    register(queue, "w")
    running = claim_one(queue, "w")
    assert queue.cancel([a.task_id, b.task_id, c.task_id]) == (2, 1)
    assert queue.counts()["failed"] == 2 and queue.counts()["todo"] == 0
    beat = queue.heartbeat("w", "tok-w", 60_000, {})
    assert beat.cancel == [running.task_id]
    assert queue.retry([b.task_id]) == 1
    assert claim_one(queue, "w").task_id == b.task_id


def held_in_step(queue, client) -> None:
    """The counters agree with the sets and queues they count, and no flag outlives a run."""
    counts = queue.counts()
    assert counts["running"] == client.zcard(queue.key("s", "running"))
    assert counts["finished"] == client.zcard(queue.key("s", "finished"))
    assert counts["failed"] == client.zcard(queue.key("s", "failed"))
    queued = sum(client.zcard(k) for k in client.scan_iter(match=queue.key("q", "*")))
    assert counts["todo"] == queued
    assert client.smembers(queue.key("cancel")) <= {
        x for x in client.zrange(queue.key("s", "running"), 0, -1)}


# Every way a running task can go back to the queue other than by finishing or failing for good.
RETURNS = {
    "retryable failure": lambda q, c: q.fail(c.task_id, "w", c.attempt, {"reason": "exit 1"},
                                             True),
    "eviction": lambda q, c: q.evict(c.task_id, "w", c.attempt, 100, 5, "evicted", "budget", {}),
    # An eviction that would fail the task for good also leaves its cancel the reason.
    "eviction past its budget": lambda q, c: q.evict(c.task_id, "w", c.attempt, 100, 0,
                                                     "evicted", "budget", {}),
    "eviction beyond every room": lambda q, c: q.evict(c.task_id, "w", c.attempt, 16_384, 5,
                                                       "evicted", "budget", {}),
    "requeue": lambda q, c: q.requeue(c.task_id, "w", c.attempt, "requeued"),
    "requeue of its worker": lambda q, c: q.requeue_worker("w", "restart"),
    "deregistration": lambda q, c: q.deregister("w", "tok-w", {}),
}


@pytest.mark.parametrize("way", RETURNS)
def test_a_cancel_is_not_undone_by_the_task_going_back_to_the_queue(queue, client, way):
    s = spec("work")
    queue.submit([s])
    register(queue, "w")
    c = claim_one(queue, "w")
    assert queue.cancel([s.task_id]) == (0, 1)
    RETURNS[way](queue, c)
    task = queue.task(s.task_id)
    assert (task["state"], task["reason"]) == ("failed", "cancelled")
    assert not client.sismember(queue.key("cancel"), s.task_id)
    held_in_step(queue, client)
    # Retried by the user, it runs again without a stale flag killing it, on a worker with room
    # for the peak its eviction recorded.
    assert queue.retry([s.task_id]) == 1
    register(queue, "w2", room_mb=32_768)
    again = claim_one(queue, "w2")
    assert again.task_id == s.task_id
    assert queue.heartbeat("w2", "tok-w2", 60_000, {}).cancel == []


def test_a_cancel_is_not_undone_by_the_reaper(queue, client):
    s = spec("work")
    queue.submit([s])
    register(queue, "w", ttl_ms=100)
    claim_one(queue, "w")
    assert queue.cancel([s.task_id]) == (0, 1)
    wait_for(lambda: not client.exists(queue.key("lease", "w")), 5, "lease expiry")
    assert queue.reap().requeued == 1
    assert queue.task(s.task_id)["reason"] == "cancelled"
    assert queue.counts()["failed"] == 1
    held_in_step(queue, client)


def test_recorded_outcomes_stay_listed_until_the_worker_says_it_renamed_their_files(queue, client):
    """A worker renames an attempt's files after the queue recorded the attempt as the task's
    outcome. Until it says it did, the queue lists the attempt under the worker, so that
    whoever takes over after a kill in between can rename them; an attempt that went back
    to the queue has no files to keep, and a task retried since has a new outcome coming."""
    names = ("finished", "failed", "retryable", "evicted", "over budget", "retried")
    ids = {n: spec(n, retries=1).task_id for n in names}
    queue.submit([spec(n, retries=1) for n in names])
    register(queue, "w")
    assert len(queue.claim("w", "tok-w", 1e9, 1e9, 10)) == len(names)
    assert queue.finish(ids["finished"], "w", 1, {"exit_code": 0}) == 1
    assert queue.fail(ids["failed"], "w", 1, {"reason": "exit code 2"}, False) == 1
    assert queue.fail(ids["retryable"], "w", 1, {"reason": "exit code 1"}, True) == 2
    assert queue.evict(ids["evicted"], "w", 1, 100, 5, "evicted", "budget", {}) == 2
    assert queue.evict(ids["over budget"], "w", 1, 100, 0, "evicted", "budget", {}) == 1
    assert queue.fail(ids["retried"], "w", 1, {"reason": "exit code 2"}, False) == 1
    assert queue.retry([ids["retried"]]) == 1
    assert sorted(queue.outputs("w")) == sorted(
        (ids[n], 1) for n in ("finished", "failed", "over budget"))
    # The retried task's id leaves the set: its files are no longer the outcome's.
    assert ids["retried"].encode() not in client.smembers(queue.key("out", "w"))
    queue.outputs_kept("w", [ids["finished"], ids["failed"]])
    assert queue.outputs("w") == [(ids["over budget"], 1)]
    # A clean stop comes after every rename: nothing of the name is left to take over.
    assert queue.deregister("w", "tok-w", {}) == 0
    assert queue.outputs("w") == []


def test_a_dead_workers_outcomes_retried_since_leave_nothing_behind(queue, client):
    """The ids of a dead worker's outcomes that the user retried stayed in P:out:<worker>
    for ever: the reap left them out of the files to keep but never deleted them."""
    a = spec("a")
    queue.submit([a])
    ok, _ = queue.register("w", "tok-w", 100, {"host": "test", "pid": 1,
                                               "results_dir": "/shared/results"})
    assert ok
    claim_one(queue, "w")
    assert queue.fail(a.task_id, "w", 1, {"reason": "exit code 2"}, False) == 1
    assert queue.retry([a.task_id]) == 1
    wait_for(lambda: not client.exists(queue.key("lease", "w")), 5, "lease expiry")
    assert queue.reap("/shared/results") == (0, [], [], [])
    assert not client.exists(queue.key("out", "w"))


def test_a_retried_task_shows_nothing_of_its_last_attempt_while_it_runs_again(queue):
    """show and export printed a running retry with the end, exit code, run time and output
    of the attempt before it, and a reap before the new attempt's annotation read the old
    attempt's pid as the process to kill."""
    task = spec("flaky", retries=3)
    queue.submit([task])
    register(queue, "w")
    first = claim_one(queue, "w")
    queue.annotate(task.task_id, "w", first.attempt, {"pid": 4242, "host": "h", "pstart": "9"})
    assert queue.fail(task.task_id, "w", first.attempt,
                      {"reason": "exit code 1", "exit_code": 1, "ended": "1.5", "wall_s": "0.5",
                       "peak_mem": 1024, "host": "h", "stdout_tail": "out",
                       "stderr_tail": "err"}, True) == 2
    assert queue.task(task.task_id)["exit_code"] == "1"
    second = claim_one(queue, "w")
    assert second.attempt == 2
    now = queue.task(task.task_id)
    assert now["state"] == "running" and now["reason"] == "exit code 1"
    for field in ("ended", "exit_code", "wall_s", "peak_mem", "host", "pid", "pstart",
                  "stdout_tail", "stderr_tail"):
        assert field not in now, field


def test_the_reaper_hands_a_dead_workers_files_to_a_worker_of_its_results_dir(queue, client):
    a, b, c, d = (spec(x) for x in "abcd")
    queue.submit([a, b, c, d])
    for name, results in (("w", "/shared/results"), ("x", "/elsewhere/results")):
        ok, _ = queue.register(name, f"tok-{name}", 100,
                               {"host": "test", "pid": 1, "results_dir": results})
        assert ok
        assert len(queue.claim(name, f"tok-{name}", 1e9, 1e9, 2)) == 2
    assert queue.finish(a.task_id, "w", 1, {"exit_code": 0}) == 1
    assert queue.finish(c.task_id, "x", 1, {"exit_code": 0}) == 1
    wait_for(lambda: not client.exists(queue.key("lease", "w"), queue.key("lease", "x")), 5,
             "lease expiry")
    # The output of the outcome w recorded, and what its requeued attempt b wrote.
    assert queue.reap("/shared/results") == (2, [("w", a.task_id, 1)], [(b.task_id, 1)], [])
    # x wrote elsewhere: its files wait for x itself to come back.
    assert queue.outputs("x") == [(c.task_id, 1)]
    assert queue.outputs("w") == [(a.task_id, 1)]
    queue.outputs_kept("w", [a.task_id])
    assert queue.outputs("w") == []
    assert queue.counts()["todo"] == 2


def test_a_dead_workers_chores_wait_for_a_worker_of_its_directory_and_of_its_host(queue, client):
    """Whoever requeues a dead worker's tasks (here a `distcomp status`, which passes neither a
    directory nor a host), its files go to the first worker of the same results directory and
    the processes its tasks left running to the first worker of the same host, each once."""
    a, b, c = (spec(x) for x in "abc")
    queue.submit([a, b, c])
    ok, _ = queue.register("w", "tok-w", 100, {"host": "h1", "pid": 1,
                                               "results_dir": "/shared/results"})
    assert ok
    assert len(queue.claim("w", "tok-w", 1e9, 1e9, 3)) == 3
    assert queue.finish(a.task_id, "w", 1, {"exit_code": 0}) == 1
    assert queue.annotate(b.task_id, "w", 1, {"host": "h1", "pid": 4242, "pstart": "99"}) == 1
    assert queue.annotate(c.task_id, "w", 1, {"host": "h2", "pid": 4343, "pstart": "77"}) == 1
    wait_for(lambda: not client.exists(queue.key("lease", "w")), 5, "lease expiry")
    assert queue.reap() == (2, [], [], [])
    assert queue.counts()["todo"] == 2
    assert queue.reap("/elsewhere/results", "h2") == (0, [], [], [])
    n, keep, drop, orphans = queue.reap("/shared/results", "h9")
    assert (n, keep, sorted(drop), orphans) == (
        0, [("w", a.task_id, 1)], sorted([(b.task_id, 1), (c.task_id, 1)]), [])
    assert queue.reap("/shared/results", "h1") == (0, [], [], [(b.task_id, 4242, "99")])
    assert queue.reap("/shared/results", "h1") == (0, [], [], [])
    assert client.keys(queue.key("left") + "*") == []
    assert client.keys(queue.key("chores") + "*") == []


def test_a_reap_reads_no_chores_of_other_hosts_and_directories(own_redis):
    """Chores of dead workers on hosts that never run a worker again stay until one does; a
    worker's reap, every heartbeat, must not read them. Redis counts the commands its scripts
    run, which shows what the reap looked at."""
    server = own_redis()
    queue, client = Queue(Redis(server.url), "p"), redis.Redis(port=server.port)
    specs = [spec(f"t{i}") for i in range(20)]
    queue.submit(specs)
    for i, s in enumerate(specs):
        ok, _ = queue.register(f"w{i}", f"tok-w{i}", 500, {"host": f"h{i}",
                                                         "results_dir": f"/r{i}"})
        assert ok and claim_one(queue, f"w{i}").task_id == s.task_id
        assert queue.annotate(s.task_id, f"w{i}", 1, {"host": f"h{i}", "pid": 100 + i,
                                                      "pstart": "5"}) == 1
    wait_for(lambda: not client.keys("p:lease:*"), 5, "lease expiry")
    assert queue.reap().requeued == 20
    client.config_resetstat()
    assert queue.reap("/mine", "hmine") == (0, [], [], [])
    reads = {k: v["calls"] for k, v in client.info("commandstats").items()
             if k in ("cmdstat_hgetall", "cmdstat_hmget", "cmdstat_hget", "cmdstat_smembers")}
    assert reads == {"cmdstat_smembers": 2}
    assert queue.reap("/r7", "h7") == (0, [], [(specs[7].task_id, 1)],
                                       [(specs[7].task_id, 107, "5")])


def outage(server: RedisServer, queue: Queue, how: str) -> None:
    """No worker reaches Redis for 4 s, longer than the 3 s leases of the tests below: it is
    restarted from disk (Redis keeps absolute expiry times), frozen, or cut off from the workers
    while a `distcomp wait` on the manager goes on reaping."""
    if how == "restart":
        redis.Redis(port=server.port).shutdown(save=True)
        server.proc.wait(10)
        time.sleep(4.0)  # the outage itself
        server.start()
    elif how == "freeze":
        server.proc.send_signal(signal.SIGSTOP)
        time.sleep(4.0)  # the outage itself
        server.proc.send_signal(signal.SIGCONT)
    else:
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            assert queue.reap().requeued == 0
            time.sleep(0.2)  # `distcomp wait --interval 0.2`


@pytest.mark.parametrize("how", ["restart", "freeze", "cut"])
def test_leases_do_not_run_down_while_no_worker_can_reach_redis(how, own_redis):
    """After an outage longer than the lease term (a reboot of the manager, a frozen Redis, a
    manager cut off from every worker) every lease has expired by Redis's clock. The workers
    were only waiting for Redis: the first reap after it must not take their tasks away, and a
    worker that does not come back is still reaped once its term is over."""
    server = own_redis()
    queue = Queue(Redis(server.url), "p")
    back, gone = spec("back"), spec("gone")
    queue.submit([back, gone])
    for name, s in (("w-back", back), ("w-gone", gone)):
        register(queue, name, ttl_ms=3000)
        assert claim_one(queue, name).task_id == s.task_id
    assert queue.reap("/results", "h").requeued == 0
    outage(server, queue, how)
    assert queue.reap().requeued == 0  # the first reap after it: a `distcomp wait`
    assert queue.counts()["running"] == 2
    beat = queue.heartbeat("w-back", "tok-w-back", 60_000, {})
    assert beat.status != 0 and beat.running == {back.task_id}
    wait_for(lambda: queue.reap("/results", "h").requeued == 1, 10,
             "w-back's reaps to find the lease of w-gone run out")
    assert queue.task(back.task_id)["state"] == "running"
    assert queue.task(gone.task_id)["state"] == "todo"


def test_a_live_worker_reaping_at_its_pace_does_not_hold_off_a_dead_ones_reaping(queue):
    """Silences give leases time back only when they are longer than any live worker's pace:
    workers with 2 s leases reap every 0.5 s, and a reap looks at the time once it is over a
    second old, so a silence must be more than that (2 s at least; half the term would be 1 s)
    or every look would put the end of the dead worker's lease off again, for ever."""
    s = spec("work")
    queue.submit([s])
    register(queue, "live", ttl_ms=2000)
    register(queue, "dead", ttl_ms=2000)
    assert claim_one(queue, "dead").task_id == s.task_id

    def live_worker_reaps() -> bool:
        time.sleep(0.5)  # the live worker's heartbeat interval, the pace under test
        queue.heartbeat("live", "tok-live", 2000, {})
        return queue.reap("/results", "h").requeued == 1

    wait_for(live_worker_reaps, 10, "the dead worker's lease to run out", interval=0)
    assert queue.task(s.task_id)["state"] == "todo"


def test_deregistering_requeues_what_is_still_listed_as_running_there(queue, client):
    a, b = spec("a"), spec("b")
    queue.submit([a, b])
    register(queue, "w")
    assert len(queue.claim("w", "tok-w", 1e9, 1e9, 5)) == 2
    # The worker's own requeue never arrived (Redis was away); it deregisters once Redis is back.
    assert queue.deregister("w", "tok-w", {}) == 2
    assert queue.running_on("w") == set() and queue.counts()["todo"] == 2
    assert "requeued: worker w stopped" in queue.task(a.task_id)["reason"]
    held_in_step(queue, client)
    register(queue, "w2")
    assert {c.task_id for c in queue.claim("w2", "tok-w2", 1e9, 1e9, 5)} == {a.task_id,
                                                                              b.task_id}


def test_deregistering_leaves_a_name_another_instance_holds_alone(queue):
    queue.submit([spec("a")])
    register(queue, "w")
    claim_one(queue, "w")
    assert queue.deregister("w", "an-old-instance", {}) == -1
    assert queue.running_on("w") != set() and queue.counts()["running"] == 1


def test_a_late_annotation_of_an_earlier_attempt_is_dropped(queue, client):
    s, first, second = taken_over(queue, client, "w1", "w2")
    assert queue.annotate(s.task_id, "w2", second.attempt, {"host": "h2", "pid": 2}) == 1
    assert queue.annotate(s.task_id, "w1", first.attempt, {"host": "h1", "pid": 1}) == 0
    task = queue.task(s.task_id)
    assert (task["host"], task["pid"]) == ("h2", "2")


def test_a_request_whose_reply_was_lost_is_answered_as_the_first_time(redis_server, namespace):
    """Submit, cancel, retry and requeue of a worker are sent again when the connection breaks
    after Redis ran them; the resend gets the first reply (what the user is told was done) and
    changes nothing."""
    proxy = ReplyLoser(redis_server.port)
    try:
        q = Queue(Redis(proxy.url), namespace)
        warm = spec("loads the scripts")
        q.submit([warm])
        q.cancel([warm.task_id])
        q.retry([warm.task_id])
        q.requeue_worker("nobody", "loads the script")
        specs = [spec(f"echo {i}") for i in range(3)]
        ids = [s.task_id for s in specs]
        proxy.lose_next()
        assert q.submit(specs) == (3, 0, 0)
        proxy.lose_next()
        assert q.cancel(ids) == (3, 0)
        proxy.lose_next()
        assert q.retry(ids) == 3
        assert q.register("w", "tok-w", 60_000, {"host": "h", "room_mb": 1024})[0]
        assert len(q.claim("w", "tok-w", 1024, 4, 2)) == 2
        proxy.lose_next()
        assert q.requeue_worker("w", "gone") == 2
        assert proxy.lost == 4
        assert q.counts() == {"todo": 4, "running": 0, "finished": 0, "failed": 0, "total": 4}
    finally:
        proxy.close()


@pytest.mark.parametrize("foreign", ["buckets", "counts", "task", "bucket"])
def test_a_submit_that_meets_foreign_keys_writes_nothing(queue, client, foreign):
    """Redis does not undo a script that fails half-way: a task stored before the failing write
    would be in no queue, and a later submit would count it as already queued - lost."""
    s = spec("work")
    key = {"buckets": queue.key("buckets"), "counts": queue.key("counts"),
           "task": queue.key("t", s.task_id), "bucket": queue.key("q", "m0c2")}[foreign]
    client.set(key, "not distcomp's")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        queue.submit([spec("other"), s])
    assert client.keys(queue.key("*")) == [key.encode()]
    client.delete(key)
    assert queue.submit([s]) == (1, 0, 0)
    register(queue, "w")
    assert claim_one(queue, "w").task_id == s.task_id


def test_registration_refuses_a_live_name_and_reports_leftovers(queue):
    queue.submit([spec("x")])
    register(queue, "w")
    c = claim_one(queue, "w")
    ok, holder = queue.register("w", "other", 60_000, {"host": "h2"})
    assert not ok and holder["host"] == "test"
    ok, leftovers = queue.register("w", "other", 60_000, {"host": "h2"}, force=True)
    assert ok and leftovers == [c.task_id]
    assert queue.requeue_worker("w", "restart") == 1
    assert queue.counts()["todo"] == 1


@pytest.mark.parametrize("one_by_one", [1500, 100])
def test_an_export_by_state_misses_no_task_that_stays_in_it(queue, one_by_one):
    """A state is read in pages. Pages by index skipped a task when one before it left the state
    between two pages. Tasks failed one by one have times of their own; a cancel gives a
    thousand of them the same time, and then the second page starts among those."""
    specs = [spec(f"j {i}", cpu=0) for i in range(1500)]
    queue.submit(specs)
    register(queue, "w")
    for c in queue.claim("w", "tok-w", 1e9, 1e9, one_by_one):
        assert queue.fail(c.task_id, "w", c.attempt, {"reason": "exit 1"}, False) == 1
    rest = [s.task_id for s in specs[one_by_one:]]
    assert queue.cancel(rest) == (len(rest), 0)
    failed = queue.ids_in_state("failed")
    seen = []
    for tid, _ in queue.iter_tasks(["reason"], states=["failed"], chunk=1000):
        if not seen:  # the first page is read: a user retries a task of it
            assert queue.retry([failed[0]]) == 1
        seen.append(tid)
    assert seen == failed
    assert list(queue.iter_ids_in_state("failed")) == failed[1:]  # each once


def test_namespaces_are_isolated(client, redis_server, namespace):
    client.set("foreign:key", "keep")
    a = Queue(Redis(redis_server.url), namespace + "a")
    b = Queue(Redis(redis_server.url), namespace + "b")
    a.submit([parse_line(b"shell:1:0:1:echo a")])
    assert b.counts()["total"] == 0
    assert b.purge() == 0
    assert a.purge() > 0
    assert client.get("foreign:key") == b"keep"


def test_a_purge_racing_submits_leaves_every_task_it_keeps_claimable(queue, redis_server,
                                                                     namespace, client):
    """Tasks submitted while a purge runs are either gone with it or kept whole. A purge in
    batches deleted the queue and the counts in one batch and new tasks' hashes survived in
    another: tasks counted as todo that no claim could ever find."""
    queue.submit([spec(f"echo old {i}", mem_gb=i % 4) for i in range(60000)])
    other = Queue(Redis(redis_server.url), namespace)
    started, stop = threading.Event(), threading.Event()

    def submit_one_at_a_time() -> None:
        i = 0
        while not stop.is_set():
            other.submit([spec(f"echo new {i}", mem_gb=i % 4)])
            started.set()
            i += 1

    racer = threading.Thread(target=submit_one_at_a_time)
    racer.start()
    try:
        started.wait(30)
        assert queue.purge() >= 60000
    finally:
        stop.set()
        racer.join()
    queued = set()
    for key in client.scan_iter(f"{namespace}:q:*"):
        queued |= {m.decode() for m in client.zrange(key, 0, -1)}
    todo = {k.decode().rsplit(":", 1)[1] for k in client.scan_iter(f"{namespace}:t:*")
            if client.hget(k, "state") == b"todo"}
    assert todo == queued
    assert int(client.hget(f"{namespace}:counts", "todo") or 0) == len(todo)


def test_evicted_task_bigger_than_every_worker_fails_instead_of_waiting_forever(queue):
    s = spec("grows")
    queue.submit([s])
    register(queue, "small", room_mb=1000)
    register(queue, "large", room_mb=2000)
    c = claim_one(queue, "small")
    assert queue.evict(c.task_id, "small", c.attempt, 1500, 10, "evicted", "budget", {}) == 2
    c = claim_one(queue, "large")
    assert queue.evict(c.task_id, "large", c.attempt, 2500, 10, "evicted", "budget", {}) == 1
    task = queue.task(s.task_id)
    assert task["state"] == "failed"
    assert task["reason"] == ("needs 2500 MiB (peak seen when evicted from large), more than any "
                              "live worker has room for (largest: 2000 MiB)")


def test_unplaceable_counts_tasks_no_live_worker_can_take(queue, client):
    queue.submit([spec("fits", mem_gb=1), spec("huge", mem_gb=64), spec("wide", cpu=128)])
    assert queue.unplaceable() == 0, "no live worker: nothing to judge against"
    register(queue, "w", room_mb=8192)
    client.hset(queue.key("w", "w"), "cores", 16)
    assert queue.unplaceable() == 2


def test_unplaceable_counts_the_tasks_of_a_class_that_straddles_the_largest_room(queue, client):
    """A class spans sizes up to twice its floor: 2 GB tasks (the README's example) in the class
    of 1-2 GiB beside 1.75 GiB of room, or 4-core tasks in the class of 2-4 cores beside 3
    cores, waited for ever while `status` and `wait` counted none of them as needing a bigger
    worker: only classes wholly beyond the room counted."""
    queue.submit([spec("too big", mem_gb=2), spec("fits", mem_gb=1.5),
                  spec("too wide", cpu=4), spec("narrow enough", cpu=2.5), spec("free", cpu=0)])
    register(queue, "w", room_mb=1792)
    client.hset(queue.key("w", "w"), "cores", 3)
    assert queue.unplaceable() == 2


def test_a_claim_in_a_pipeline_runs_once_when_redis_lost_some_scripts(queue, client):
    """The worker sends its reports and its next claim in one pipeline. When Redis has lost
    scripts (restart, SCRIPT FLUSH) only the commands it refused are sent again: a claim that
    ran is not run a second time."""
    queue.submit([spec(f"echo {i}") for i in range(6)])
    register(queue, "w")
    done = claim_one(queue, "w")
    client.script_flush()
    client.script_load(queue._scripts["claim"].source)
    pipe = queue.pipeline()
    queue.claim("w", "tok-w", 1e9, 1e9, 2, client=pipe)
    queue.finish(done.task_id, "w", done.attempt, {"exit_code": 0}, client=pipe)
    rows, finished = pipe.execute()
    claims = Queue.claims(rows)
    assert finished == 1 and len(claims) == 2
    assert queue.counts() == {"todo": 3, "running": 2, "finished": 1, "failed": 0, "total": 6}
    assert {c.task_id for c in claims} == {
        x.decode() for x in client.smembers(queue.key("run", "w"))}


def test_every_transition_that_makes_tasks_claimable_sends_one_notice(queue, client):
    """Idle workers wait for these notices instead of polling: each script run that puts
    tasks in the queue publishes exactly one, and nothing else publishes. Messages arrive in
    order, so a marker published after each step shows what that step sent."""
    sent = notice_counter(queue, client, "wake")

    a, b, c, d = (spec(x, retries=1) for x in "abcd")
    assert sent(lambda: queue.submit([spec(f"echo {i}") for i in range(2500)])) == 3  # 3 chunks
    assert sent(lambda: queue.submit([spec("echo 1")])) == 0, "nothing new: no notice"
    queue.purge()
    assert sent(lambda: queue.submit([a, b, c, d])) == 1
    register(queue, "w")
    assert [x.params for x in queue.claim("w", "tok-w", 1e9, 1e9, 3)] == ["a", "b", "c"]
    assert sent(lambda: queue.finish(a.task_id, "w", 1, {})) == 0
    assert sent(lambda: queue.claim("w", "tok-w", 1e9, 1e9, 1)) == 0  # takes d
    assert sent(lambda: queue.fail(b.task_id, "w", 1, {}, True)) == 1  # back for a retry
    assert sent(lambda: queue.evict(c.task_id, "w", 1, 10, 5, "e", "b", {})) == 1
    assert [(x.params, x.attempt) for x in queue.claim("w", "tok-w", 1e9, 1e9, 5)] == [
        ("b", 2), ("c", 2)]
    assert sent(lambda: queue.fail(b.task_id, "w", 2, {}, True)) == 0  # failed for good
    assert sent(lambda: queue.requeue(c.task_id, "w", 2, "r")) == 1
    assert sent(lambda: queue.requeue_worker("w", "gone")) == 1  # d
    register(queue, "short", ttl_ms=100)
    assert len(queue.claim("short", "tok-short", 1e9, 1e9, 5)) == 2
    wait_for(lambda: not client.exists(queue.key("lease", "short")), 5, "lease expiry")
    assert sent(queue.reap) == 1
    assert sent(lambda: queue.retry([b.task_id])) == 1
    assert sent(lambda: queue.cancel([b.task_id])) == 0
    assert queue.counts() == {"todo": 2, "running": 0, "finished": 1, "failed": 1, "total": 4}


def test_the_script_that_leaves_nothing_todo_or_running_announces_it(queue, client):
    """``distcomp wait`` returns on this notice: the last task settling sends it, whether it
    finished, failed for good or was cancelled, and nothing sends it while tasks remain."""
    sent = notice_counter(queue, client, "drained")
    a, b, c = (spec(x, retries=0) for x in "abc")
    queue.submit([a, b, c])
    register(queue, "w")
    queue.claim("w", "tok-w", 1e9, 1e9, 2)
    assert sent(lambda: queue.finish(a.task_id, "w", 1, {})) == 0
    assert sent(lambda: queue.cancel([c.task_id])) == 0  # b still runs
    assert sent(lambda: queue.fail(b.task_id, "w", 1, {}, True)) == 1  # no retries left
    assert sent(lambda: queue.retry([b.task_id])) == 0
    queue.claim("w", "tok-w", 1e9, 1e9, 1)
    assert sent(lambda: queue.finish(b.task_id, "w", 2, {})) == 1
    assert sent(lambda: queue.retry([c.task_id])) == 0
    assert sent(lambda: queue.cancel([c.task_id])) == 1


def notice_counter(queue, client, channel: str):
    """Subscribe to one of the queue's notice channels; returns ``sent(step)``, the number of
    notices ``step`` published. Messages arrive in order, so a marker published after the step
    shows where its notices end."""
    sub = queue.notices(channel)
    assert sub.get_message(timeout=5)["type"] == "subscribe"

    def sent(step) -> int:
        step()
        client.publish(queue.key(channel), "marker")
        n = 0
        while sub.get_message(timeout=5)["data"] != b"marker":
            n += 1
        return n

    return sent


def test_a_lone_workers_reaps_keep_the_cluster_heard_from_at_a_short_lease(queue, client):
    """With a lease term of 4 s a worker reaps every second and the silence that gives leases
    their time back is 2 s. Its reaps wrote the time they were heard only once it was over a
    second old, so about every 2 s: each such gap counted as a silence, and every lease, a
    dead worker's too, got 2 s more, again and again. A reap now writes it once it is a
    quarter of that silence old."""
    register(queue, "w", ttl_ms=4000)
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    client.set(queue.key("beat"), now_ms - 700)
    queue.reap("/results", "h")
    assert int(client.get(queue.key("beat"))) >= now_ms


def test_a_stop_request_is_stamped_with_redis_time_not_the_callers(queue, client, monkeypatch):
    """Workers compare the stop request with when they registered: stamped by the clock of
    whoever ran `stop-workers`, a clock ahead of a worker's stopped it again as soon as it
    was redeployed (and exit 10 kept it down), one behind was ignored."""
    monkeypatch.setattr("distcomp.queue.time.time", lambda: 4_000_000_000.0)
    before = queue.now()
    queue.stop_workers()
    after = queue.now()
    assert before <= float(client.get(queue.key("stop"))) <= after


def test_the_best_priority_wins_across_resource_classes(queue):
    """Each resource class has its own queue; a claim compares their heads. Found by breaking
    the comparison: every test then still passed, each with one class or one task fitting."""
    hi = spec("hi", priority=9)
    queue.submit([*(spec(f"o{i}", mem_gb=2 ** i) for i in range(6)), hi])
    register(queue, "w")
    assert claim_one(queue, "w").task_id == hi.task_id


def test_a_late_report_of_an_earlier_attempt_under_the_same_name_is_rejected(queue, client):
    """A restarted worker takes its old name: the report of the attempt its previous instance
    ran must not settle the attempt the new one runs. Fencing is by name and attempt."""
    s, first, second = taken_over(queue, client, "w", "w")
    assert (first.attempt, second.attempt) == (1, 2)
    assert queue.finish(s.task_id, "w", 1, {"exit_code": 0}) == 0
    assert queue.task(s.task_id)["state"] == "running"


def test_a_heartbeat_of_an_instance_whose_name_was_taken_over_is_refused(queue):
    """Status 0 is what makes the old instance stop (LeaseLost) instead of taking the lease
    back from the new one."""
    register(queue, "w")
    ok, _ = queue.register("w", "tok-new", 60_000, {"host": "test", "pid": 2}, True)
    assert ok
    assert queue.heartbeat("w", "tok-w", 60_000, {}).status == 0
    assert queue.heartbeat("w", "tok-new", 60_000, {}).status == 1


def test_retry_gives_a_failed_task_its_budgets_again(queue):
    s = spec("flaky", retries=1)
    queue.submit([s])
    register(queue, "w")
    for outcome in (2, 1):
        c = claim_one(queue, "w")
        assert queue.fail(c.task_id, "w", c.attempt, {"reason": "exit 1"}, True) == outcome
    assert queue.retry([s.task_id]) == 1
    c = claim_one(queue, "w")
    assert queue.fail(c.task_id, "w", c.attempt, {"reason": "exit 1"}, True) == 2


def test_a_worker_takes_its_own_failure_back_once_the_avoid_window_is_over(queue):
    s = failed_on_w1(queue)
    assert queue.claim("w1", "tok-w1", 1e9, 1e9, 1, avoid_window_s=60) == []
    assert [x.task_id for x in queue.claim("w1", "tok-w1", 1e9, 1e9, 1, avoid_window_s=0)] == \
        [s.task_id]


def test_a_cancelled_queued_task_is_never_claimed(queue):
    a, b = spec("a"), spec("b")
    queue.submit([a, b])
    register(queue, "w")
    assert queue.cancel([a.task_id, b.task_id]) == (2, 0)
    assert claim_one(queue, "w") is None


@pytest.mark.parametrize("own_room, other_room", [(8192, None), (150, 8192)],
                         ids=["its-own-worker", "another-worker-heard-before-the-silence"])
def test_an_eviction_reported_after_a_silence_finds_the_room_the_workers_have(
        queue, client, own_room, other_room):
    """After a silence of Redis longer than the lease term, every lease's deadline is past until
    the first reap gives it the silence back (``_REAP``). An eviction reported before that reap
    found no live worker, room 0, and failed its task for good ("largest: 0 MiB"), the reporting
    worker's own room included."""
    tok = register(queue, "w1", ttl_ms=2000, room_mb=own_room)
    if other_room:
        register(queue, "w2", ttl_ms=2000, room_mb=other_room)
    queue.submit([spec("python big.py", mem_gb=0.1)])
    queue.reap("/results", "h")  # a worker's heartbeat reap: P:beat written
    (claimed,) = queue.claim("w1", tok, 1e9, 1e9, 1)
    # The silence: nobody reached Redis for 3 s, so the 2 s leases' deadlines are past.
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    client.set(queue.key("beat"), now_ms - 3000)
    client.zadd(queue.key("leases"), {"w1": now_ms - 1000, "w2": now_ms - 1000})
    outcome = queue.evict(claimed.task_id, "w1", claimed.attempt, 200, 3,
                          "evicted: memory short", "budget", {})
    task = queue.task(claimed.task_id)
    assert (outcome, task["state"]) == (2, "todo"), task.get("reason")


def test_tasks_too_large_for_a_worker_do_not_hide_the_ones_behind_them(queue, client):
    """A bucket spans sizes up to twice its floor: 16 tasks of 4 GiB at its head filled the
    look-ahead of a worker with 3.5 GiB, which never read the 3 GiB tasks behind them; the
    queue stood still with room to spare."""
    tok = register(queue, "w1", room_mb=3500)
    queue.submit([spec(f"big {i}", priority=1, mem_gb=4) for i in range(40)] +
                 [spec(f"small {i}", mem_gb=3) for i in range(2)])
    assert len(client.smembers(queue.key("buckets"))) == 1
    assert [c.params for c in queue.claim("w1", tok, 3500, 8, 4)] == ["small 0"]
    assert [c.params for c in queue.claim("w1", tok, 3500, 8, 4)] == ["small 1"]
    assert queue.claim("w1", tok, 3500, 8, 4) == []


def test_a_reservation_holds_through_a_silence_of_redis(queue, client, monkeypatch):
    """After a silence longer than the lease term every deadline is past until the first reap
    gives the leases their time back: another worker took the reserving worker for dead and
    reserved the task for itself."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    big, _ = _reserved(queue, client)
    register(queue, "w2", room_mb=1000)
    queue.reap("/results", "h")  # a worker's heartbeat reap: P:beat written
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    client.set(queue.key("beat"), now_ms - 40_000)
    client.zadd(queue.key("leases"), {"w1": now_ms - 1000, "w2": now_ms - 1000})
    assert _params(queue.claim("w2", "tok-w2", 300, 8, 1)) == ["small 2"]
    assert _params(queue.claim("w2", "tok-w2", 300, 8, 1)) == ["small 3"]
    assert client.hget(queue.key("t", big.task_id), "reserved_by") == b"w1"


@pytest.mark.parametrize("way", [w for w in RETURNS if "worker" not in w and "dereg" not in w])
def test_a_task_cancelled_while_its_worker_reports_it_back_lists_the_attempts_files(
        queue, client, way):
    """A task cancelled while its worker reports it back (a retryable failure, an eviction, a
    requeue) fails as cancelled, and the worker keeps that attempt's files as its outcome:
    listed in P:out:<worker> until the worker says they are renamed, so that a worker killed in
    between leaves them to the reaper's chores. A requeue recorded the outcome without it."""
    s = spec("work")
    queue.submit([s])
    register(queue, "w")
    c = claim_one(queue, "w")
    assert queue.cancel([s.task_id]) == (0, 1)
    assert RETURNS[way](queue, c) == 1
    assert client.sismember(queue.key("out", "w"), s.task_id)


def test_a_worker_whose_lease_is_gone_or_taken_claims_nothing(queue, client):
    """The claim is fenced by the lease: an old instance whose name was taken over, or whose
    lease ran out, would claim tasks into the new instance's running list (which hands them
    back as never started while the old one runs them: run twice), and never learn that its
    lease is gone (it learns from the claim's refusal)."""
    queue.submit([spec("a")])
    register(queue, "w")
    assert queue.register("w", "tok-new", 60_000, {"host": "test", "pid": 2,
                                                    "room_mb": 8192}, True)[0]
    assert queue.claim("w", "tok-w", 1e9, 1e9, 1) is None
    client.delete(queue.key("lease", "w"))
    assert queue.claim("w", "tok-new", 1e9, 1e9, 1) is None
    assert queue.counts()["todo"] == 1


def test_reports_are_fenced_by_the_worker_as_well_as_the_attempt(queue):
    """A report from another worker with the same attempt number (a requeue decided on an
    attempt read after another worker had claimed the task) took the task out of the wrong
    worker's running list and recorded an outcome nobody had."""
    s = spec("a")
    queue.submit([s])
    register(queue, "w1")
    register(queue, "w2")
    c = claim_one(queue, "w1")
    assert queue.finish(c.task_id, "w2", c.attempt, {"exit_code": 0}) == 0
    assert queue.requeue(c.task_id, "w2", c.attempt, "requeued") == 0
    task = queue.task(s.task_id)
    assert task["state"] == "running" and task["worker"] == "w1"
    assert queue.finish(c.task_id, "w1", c.attempt, {"exit_code": 0}) == 1


def test_retry_runs_only_failed_tasks_again_with_fresh_budgets(queue):
    """retry of a finished task ran completed work again and took the failed count below zero;
    and a task failed for its evictions kept its count, failing for good at its next
    eviction, and the workers that failed it still avoided it (docs: fresh budgets)."""
    done, evicted = spec("done"), spec("evicted")
    queue.submit([done, evicted])
    register(queue, "w1")
    register(queue, "w2")
    c = queue.claim("w1", "tok-w1", 1e9, 1e9, 2)
    by_id = {x.task_id: x for x in c}
    assert queue.finish(done.task_id, "w1", by_id[done.task_id].attempt, {"exit_code": 0}) == 1
    assert queue.evict(evicted.task_id, "w1", by_id[evicted.task_id].attempt, 10, 0, "evicted",
                       "over budget", {}) == 1
    assert queue.retry([done.task_id, evicted.task_id]) == 1
    assert queue.task(done.task_id)["state"] == "finished"
    assert queue.counts() == {"todo": 1, "running": 0, "finished": 1, "failed": 0, "total": 2}
    task = queue.task(evicted.task_id)
    assert task.get("evictions", "0") == "0", task
    c = queue.claim("w1", "tok-w1", 1e9, 1e9, 1, avoid_window_s=60)
    assert [x.task_id for x in c] == [evicted.task_id], "w1 failed it before the retry"
    assert queue.evict(evicted.task_id, "w1", c[0].attempt, 10, 1, "evicted", "over budget",
                       {}) == 2


def test_an_eviction_peak_equal_to_the_largest_room_is_requeued(queue):
    """A claim takes a task whose memory equals its room; an eviction whose peak was exactly the
    largest room failed it as having no live worker with room."""
    s = spec("exact")
    queue.submit([s])
    register(queue, "w", room_mb=1024)
    c = claim_one(queue, "w")
    assert queue.evict(c.task_id, "w", c.attempt, 1024, 5, "evicted", "budget", {}) == 2
    assert claim_one(queue, "w", mem=1024).task_id == s.task_id


def test_retry_lets_the_workers_that_failed_a_task_take_it_at_once(queue, client):
    """A retried task starts afresh: the workers that failed it before kept avoiding it for the
    avoid window, with another worker alive that might never have room for it."""
    s = spec("flaky", retries=1)
    queue.submit([s])
    for name in ("w1", "w2"):
        register(queue, name)
        client.hset(queue.key("w", name), "cores", 16)
    c = claim_one(queue, "w1")
    assert queue.fail(c.task_id, "w1", c.attempt, {"reason": "exit code 1"}, True) == 2
    assert claim_one(queue, "w1") is None  # left to w2 for the avoid window
    c = claim_one(queue, "w2")
    assert queue.fail(c.task_id, "w2", c.attempt, {"reason": "exit code 1"}, True) == 1
    assert queue.retry([s.task_id]) == 1
    c = queue.claim("w1", "tok-w1", 1e9, 1e9, 1, avoid_window_s=60)
    assert [x.task_id for x in c] == [s.task_id]
