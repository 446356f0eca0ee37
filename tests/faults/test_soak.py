"""Every fault at once, on a seeded schedule: worker kills, pauses past the lease, cut links and
Redis crashes while tasks keep arriving. ``--soak SECONDS`` makes the injection window longer
(the default fits the CI budget)."""

from __future__ import annotations

import signal
import time

import redis
from invariants import check, colon_line, json_line

DEFAULT_WINDOW_S = 40.0


def test_combined_soak(redis_server, cluster_factory, proxy_factory, rng, record, soak_seconds):
    window = soak_seconds or DEFAULT_WINDOW_S
    c = cluster_factory(redis_server, ttl=2.0, worker_args=["--max-tasks", "6"])
    log = str(c.task_log)
    serial = 0

    def batch(n: int) -> list[str]:
        nonlocal serial
        lines = []
        for _ in range(n):
            if rng.random() < 0.05:
                lines.append(json_line(log, serial, "sleep 0.1; (exit $((RANDOM % 2 * 3)))",
                                       max_retries=1))
            else:
                lines.append(colon_line(log, serial, f"sleep 0.{rng.randint(0, 15):02d}"))
            serial += 1
        return lines

    c.submit_lines(batch(2000))
    proxies = {f"p{i}": proxy_factory(redis_server.port) for i in range(2)}
    slots = {"d0": None, "d1": None, "p0": proxies["p0"], "p1": proxies["p1"]}
    current = {slot: c.worker(slot, url=p.url if p else None) for slot, p in slots.items()}
    generation = {slot: 0 for slot in slots}
    injected = {"kill -9 worker": 0, "SIGSTOP worker": 0, "cut link": 0, "kill -9 redis": 0}
    pending: list[tuple[float, str, str]] = []  # (when, action, slot)
    impaired: set[str] = set()
    redis_down = False
    respawns = 0
    worst_gap = 0.0
    last_done, last_move = -1, time.monotonic()
    end = time.monotonic() + window
    next_fault = time.monotonic() + rng.uniform(0.5, 2.0)
    while True:
        now = time.monotonic()
        for item in [p for p in pending if p[0] <= now]:
            pending.remove(item)
            _, action, slot = item
            if action == "cont":
                current[slot].signal(signal.SIGCONT)
            elif action == "restore":
                slots[slot].restore()
            elif action == "redis-up":
                redis_server.start()
                redis_down = False
            elif action == "respawn":
                current[slot] = c.worker(current[slot].name, url=current[slot].url)
                respawns += 1
            impaired.discard(slot)
        for slot, w in current.items():
            # What systemd (Restart=always) does for a worker that exited by itself, e.g. one
            # restarted by the schedule that found Redis down while it registered.
            if not w.alive() and slot not in impaired:
                impaired.add(slot)
                pending.append((now + 1.0, "respawn", slot))
        try:
            done = c.done()
            busy = not c.settled()
        except redis.ConnectionError:
            done, busy = last_done, True
        if done != last_done:
            last_done, last_move = done, now
        elif busy:
            worst_gap = max(worst_gap, now - last_move)
        if now >= end and not pending:
            break
        if now < end and not redis_down and now >= next_fault:
            next_fault = now + rng.uniform(0.5, 2.0)
            healthy = [s for s in slots if s not in impaired]
            fault = rng.choice(sorted(injected))
            if fault == "kill -9 redis":
                redis_server.kill9()
                redis_down = True
                pending.append((now + rng.uniform(0.5, 3.0), "redis-up", ""))
            elif len(healthy) > 2:
                slot = rng.choice(healthy)
                if fault == "kill -9 worker":
                    current[slot].kill9()
                    if rng.random() < 0.5:
                        generation[slot] += 1
                    name = slot if not generation[slot] else f"{slot}-{generation[slot]}"
                    current[slot] = c.worker(name, url=slots[slot].url if slots[slot] else None)
                elif fault == "SIGSTOP worker":
                    current[slot].signal(signal.SIGSTOP)
                    impaired.add(slot)
                    pending.append((now + rng.uniform(2.5, 5.0), "cont", slot))
                elif slots[slot] is not None:
                    slots[slot].cut()
                    impaired.add(slot)
                    pending.append((now + rng.uniform(0.5, 4.0), "restore", slot))
                else:
                    continue
            else:
                continue
            injected[fault] += 1
        if now < end and not redis_down and c.counts().get("todo", 0) < 300:
            c.submit_lines(batch(500))
        time.sleep(0.05)
    c.wait_settled(300)
    c.stop_workers()
    result = check(c)
    record.update(result, fault="combined soak: all of the above at once", window_s=window,
                  injected_by_fault=injected, injected=sum(injected.values()),
                  supervisor_restarts=respawns,
                  worst_stall_s=round(worst_gap, 3),
                  stall_meaning="longest time without a new outcome while work was queued")
    assert result["lost"] == 0
    assert sum(injected.values()) >= 5
