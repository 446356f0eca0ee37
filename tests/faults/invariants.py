"""Task lines that log their own executions, and the invariants checked after every scenario.

Each task appends ``S <id> <attempt> <worker>`` to the cluster's execution log when it starts and
``E <id> <attempt> <rc>`` when its payload is done, then prints ``attempt=<attempt>``. The log is
the ground truth of what really ran; Redis is what was recorded. The invariants compare the two.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

LOGGED = ('echo "S $DISTCOMP_TASK_ID $DISTCOMP_ATTEMPT $DISTCOMP_WORKER" >> {log}; {payload}; '
          'rc=$?; echo "E $DISTCOMP_TASK_ID $DISTCOMP_ATTEMPT $rc" >> {log}; '
          'echo "attempt=$DISTCOMP_ATTEMPT"; exit $rc')


def logged(log: str, n: int, payload: str) -> str:
    """A shell command that records its execution around ``payload``; ``n`` makes it unique."""
    return f": task{n}; " + LOGGED.format(log=log, payload=payload)


def colon_line(log: str, n: int, payload: str) -> str:
    return f"shell:0:0:0:{logged(log, n, payload)}"


def json_line(log: str, n: int, payload: str, **fields: Any) -> str:
    return json.dumps({"type": "shell", "params": logged(log, n, payload), "min_cpu": 0,
                       **fields})


def read_executions(path) -> tuple[dict[str, list[int]], dict[str, list[tuple[int, int]]]]:
    starts: dict[str, list[int]] = defaultdict(list)
    ends: dict[str, list[tuple[int, int]]] = defaultdict(list)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return starts, ends
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "S":
            starts[parts[1]].append(int(parts[2]))
        elif len(parts) == 4 and parts[0] == "E":
            ends[parts[1]].append((int(parts[2]), int(parts[3])))
    return starts, ends


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check(cluster, strict_files: bool = True, unlogged: frozenset[str] = frozenset()
          ) -> dict[str, Any]:
    """Check every invariant; return the measurements. Fails with every violation listed.

    Tasks in ``unlogged`` (hostile ones that cannot log their own execution) get every check
    except those against the execution log and their output."""
    r, ns = cluster.r, cluster.ns
    problems: list[str] = []
    ids = set(cluster.submitted)
    stored = {_s(k)[len(ns) + 3:] for k in r.scan_iter(match=f"{ns}:t:*", count=10000)}
    if stored != ids:
        problems.append(f"task hashes: {len(ids - stored)} submitted task(s) missing, "
                        f"{len(stored - ids)} unknown")
    pipe = r.pipeline(transaction=False)
    order = sorted(ids)
    for tid in order:
        pipe.hgetall(f"{ns}:t:{tid}")
    tasks = {tid: {_s(k): _s(v) for k, v in h.items()} for tid, h in zip(order, pipe.execute())}
    finished = {_s(x) for x in r.zrange(f"{ns}:s:finished", 0, -1)}
    failed = {_s(x) for x in r.zrange(f"{ns}:s:failed", 0, -1)}
    running = r.zcard(f"{ns}:s:running")
    counts = {_s(k): int(v) for k, v in r.hgetall(f"{ns}:counts").items()}
    starts, ends = read_executions(cluster.task_log)

    lost = [tid for tid, t in tasks.items() if t.get("state") not in ("finished", "failed")]
    if lost:
        problems.append(f"{len(lost)} task(s) lost (not finished or failed): "
                        f"{[(tid, tasks[tid].get('state')) for tid in lost[:5]]}")
    if finished & failed:
        problems.append(f"{len(finished & failed)} task(s) recorded both finished and failed")
    by_state = {s: {tid for tid, t in tasks.items() if t.get("state") == s}
                for s in ("finished", "failed")}
    if by_state["finished"] != finished or by_state["failed"] != failed:
        problems.append("s:finished / s:failed do not match the task states")
    if running:
        problems.append(f"{running} task(s) still listed as running")
    for key in r.scan_iter(match=f"{ns}:run:*"):
        if r.scard(key):
            problems.append(f"{_s(key)} still holds {r.scard(key)} task(s)")
    for key in r.scan_iter(match=f"{ns}:q:*"):
        if r.zcard(key):
            problems.append(f"{_s(key)} still queues {r.zcard(key)} task(s)")
    expected = {"todo": 0, "running": 0, "finished": len(by_state["finished"]),
                "failed": len(by_state["failed"])}
    if {k: counts.get(k, 0) for k in expected} != expected:
        problems.append(f"counts {counts} do not add up to {expected}")

    double_records = fenced_accepted = unexecuted_records = file_mismatch = 0
    for tid, t in tasks.items():
        if t.get("state") not in ("finished", "failed"):
            continue
        rep = t.get("reported", "")
        m = re.fullmatch(r"(.*)#(\d+)#(\d+)", rep)
        if m is None:
            if t.get("reason") != "cancelled":
                problems.append(f"{tid} is {t['state']} without a recorded report")
            continue
        worker, attempt, outcome = m.group(1), int(m.group(2)), int(m.group(3))
        if outcome != 1 or attempt != int(t["attempt"]) or worker != t.get("worker"):
            fenced_accepted += 1
            problems.append(f"{tid}: recorded report {rep!r} is not the last attempt "
                            f"({t['attempt']} on {t.get('worker')})")
        tail_attempts = set(re.findall(r"attempt=(\d+)", t.get("stdout_tail", "")))
        if t["state"] == "finished" and tid not in unlogged:
            if tail_attempts != {str(attempt)}:
                double_records += 1
                problems.append(f"{tid}: stdout tail shows attempts {sorted(tail_attempts)}, "
                                f"recorded attempt {attempt}")
            if (attempt, 0) not in ends.get(tid, []):
                unexecuted_records += 1
                problems.append(f"{tid}: finished as attempt {attempt}, which never completed "
                                f"(log: {ends.get(tid)})")
            out = cluster.results / tid[:2] / f"{tid}.out"
            shown = set(re.findall(r"attempt=(\d+)", out.read_text(errors="replace"))
                        ) if out.exists() else set()
            if shown != {str(attempt)}:
                file_mismatch += 1
                if strict_files:
                    problems.append(f"{tid}: {out.name} holds attempts {sorted(shown)}, "
                                    f"recorded attempt {attempt}")
        unknown = [a for a in starts.get(tid, []) if a > int(t["attempt"])]
        if unknown:
            problems.append(f"{tid}: executions of attempts {unknown} never claimed")

    executions = sum(len(v) for v in starts.values())
    completed_twice = sum(1 for tid in ids
                          if sum(1 for _, rc in ends.get(tid, []) if rc == 0) > 1)
    reexecuted = sum(1 for tid in ids if len(starts.get(tid, [])) > 1)
    result = {
        "tasks": len(ids), "finished": len(by_state["finished"]),
        "failed": len(by_state["failed"]), "lost": len(lost),
        "double_records": double_records, "fenced_accepted": fenced_accepted,
        "records_without_execution": unexecuted_records,
        "executions": executions, "tasks_started_more_than_once": reexecuted,
        "tasks_completed_more_than_once": completed_twice,
        "output_file_mismatch": file_mismatch,
    }
    assert not problems, "invariants violated:\n" + "\n".join(problems[:40])
    return result
