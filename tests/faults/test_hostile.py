"""Hostile tasks must not take the worker down or disturb the tasks next to them."""

from __future__ import annotations

import json

from invariants import check, colon_line

HOSTILE = {
    "kill-own-group": ("kill -9 0", "failed", "killed by SIGKILL"),
    "kill-own-session": ("kill -9 -- -$$; sleep 5", "failed", "killed by SIGKILL"),
    "close-stdout": ("exec 1>&- 2>&-; sleep 0.05; echo gone", "failed", "exit code 1"),
    "change-directory": (("cd / && cd /proc/self && cd \"$(mktemp -d)\" && rm -rf \"$PWD\" "
                          "&& pwd"), "finished", ""),
}


def test_hostile_tasks_leave_worker_and_neighbours_alone(redis_server, cluster_factory, rng,
                                                         record):
    c = cluster_factory(redis_server, ttl=3.0, worker_args=["--max-tasks", "6"])
    log = str(c.task_log)
    lines, hostile_ids = [], {}
    for i in range(400):
        lines.append(colon_line(log, i, f"sleep 0.0{rng.randint(0, 9)}"))
    for kind, (payload, _, _) in HOSTILE.items():
        for j in range(15):
            lines.append(json.dumps({"type": "shell", "params": f": {kind}{j}; {payload}",
                                     "min_cpu": 0, "max_retries": 0}))
            hostile_ids[f": {kind}{j}; {payload}"] = kind
    rng.shuffle(lines)
    c.submit_lines(lines)
    workers = [c.worker(f"w{i}") for i in range(3)]
    c.wait_settled(240)
    assert all(w.alive() for w in workers), "a hostile task took its worker down"
    c.stop_workers()
    by_kind = {tid: hostile_ids[p] for tid, p in c.submitted.items() if p in hostile_ids}
    result = check(c, unlogged=frozenset(by_kind))
    outcomes: dict[str, dict[str, int]] = {}
    for tid, kind in by_kind.items():
        t = {k.decode(): v.decode() for k, v in c.r.hgetall(f"{c.ns}:t:{tid}").items()}
        _, state, reason = HOSTILE[kind]
        assert (t["state"], t.get("reason", "")) == (state, reason), (kind, t)
        outcomes.setdefault(kind, {}).setdefault(t["state"], 0)
        outcomes[kind][t["state"]] += 1
    normal = [tid for tid in c.submitted if tid not in by_kind]
    assert result["finished"] - sum(1 for k in by_kind.values()
                                    if HOSTILE[k][1] == "finished") == len(normal)
    for w in workers:
        assert "Traceback" not in w.log(), w.log()[-3000:]
    record.update(result, fault="hostile tasks (kill own group/session, close stdout, "
                  "delete own cwd)", injected=len(by_kind), outcomes=outcomes,
                  worst_stall_s=None)
