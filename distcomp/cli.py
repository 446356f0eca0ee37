"""The ``distcomp`` command: the contract the playbooks, tests and people use (docs/cli.md)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, NoReturn, TextIO

from . import __version__
from .config import Config, ConfigError, load, parse_overcommit, parse_size
from .output import OutputError, one_line, replaced_whole
from .queue import STATES, Queue
from .redis_client import AuthError, ConnectError, RedisError, ResponseError
from .spec import TaskSpec, parse_taskfile

EXIT_OPERATIONAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT
MAX_SECONDS = 365 * 24 * 3600  # --interval, --timeout: more is a typo (inf overflows sleep)
MAX_LIST = 1_000_000  # status --limit: it reads the tasks one by one; export is for more
SHOWN_ERRORS = 20  # invalid lines listed; a binary file given by mistake has thousands


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_OPERATIONAL) -> None:
        super().__init__(message)
        self.code = code


def _emit(args: argparse.Namespace, doc: Any, human: str) -> None:
    print(json.dumps(doc, sort_keys=True) if getattr(args, "json", False) else human)


def _connect(args: argparse.Namespace) -> Queue:
    cfg: Config = args.cfg
    client = cfg.client()
    client.ping()
    return Queue(client, cfg.namespace)


# -- submit ------------------------------------------------------------------------------------
def _read_taskfile(path: str) -> tuple[str, bytes]:
    if path == "-":
        if sys.stdin is None:
            raise CliError("standard input is closed: give a taskfile, or pipe one in",
                           EXIT_BAD_INPUT)
        try:
            return "<stdin>", sys.stdin.buffer.read()
        except OSError as exc:
            raise CliError(f"cannot read standard input: {exc.strerror}", EXIT_BAD_INPUT) from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CliError(f"{path}: no such file", EXIT_BAD_INPUT) from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror}", EXIT_BAD_INPUT) from None
    if stat.S_ISDIR(st.st_mode):
        raise CliError(f"{path}: is a directory, expected a taskfile", EXIT_BAD_INPUT)
    try:
        with open(path, "rb") as fh:
            return path, fh.read()
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror}", EXIT_BAD_INPUT) from None


def cmd_submit(args: argparse.Namespace) -> int:
    if not args.wait and (args.timeout is not None or args.interval is not None):
        raise CliError("--timeout and --interval only apply with --wait", EXIT_BAD_INPUT)
    if args.wait:
        args.timeout = args.timeout or 0.0
        args.interval = 1.0 if args.interval is None else args.interval
        _check_seconds(args)
    name, data = _read_taskfile(args.file)
    parsed = parse_taskfile(data)
    for lineno, reason in parsed.errors[:SHOWN_ERRORS]:
        print(one_line(f"{name}:{lineno}: {reason}"), file=sys.stderr)
    if len(parsed.errors) > SHOWN_ERRORS:
        print(one_line(f"{name}: ... and {len(parsed.errors) - SHOWN_ERRORS} more invalid "
                        f"line(s)"), file=sys.stderr)
    if parsed.errors and not args.skip_invalid:
        _complain(f"{name}: {len(parsed.errors)} invalid line(s); nothing was submitted (fix "
                  f"them, or use --skip-invalid to submit the valid lines)")
        return EXIT_BAD_INPUT
    if not parsed.tasks:
        raise CliError(f"{name}: no tasks in file (only blank lines, comments or invalid lines)",
                       EXIT_BAD_INPUT)
    queue = _connect(args)
    before = queue.counts()["total"]
    try:
        added, existing, duplicates = queue.submit(parsed.tasks)
    except KeyboardInterrupt:
        raise CliError(f"interrupted: {_queued_so_far(args, before, parsed.tasks, name)}",
                       EXIT_INTERRUPTED) from None
    except RedisError as exc:
        raise CliError(f"{_describe_redis_error(args.cfg, exc).rstrip('.')}; "
                       f"{_queued_so_far(args, before, parsed.tasks, name)}") from None
    doc = {"added": added, "existing": existing + duplicates, "duplicates": duplicates,
           "invalid": len(parsed.errors)}
    human = f"{name}: added {added} task(s), {existing + duplicates} already queued"
    if duplicates:
        human += (f" ({duplicates} line(s) repeating an earlier line of the file: one task "
                  f"each, run once)")
    if parsed.errors:
        human += f", skipped {len(parsed.errors)} invalid line(s)"
    if not args.wait:
        _emit(args, doc, human)
        return 0
    if not args.json:
        print(human, flush=True)
    try:
        doc.update(_wait_drained(args, queue))
    except KeyboardInterrupt:
        if args.json:
            # The tasks are queued whatever the wait does: what was added is still said, as
            # the human line said it before the wait.
            print(json.dumps({**doc, "interrupted": True}, sort_keys=True), flush=True)
        raise
    return _report_drained(args, doc)


def _queued_so_far(args: argparse.Namespace, before: int, tasks: list[TaskSpec],
                   name: str) -> str:
    """What a submit that stopped part-way left behind, and that running it again is safe:
    a task's id is its content, so the tasks queued already are skipped the second time."""
    again = "submitting the same file again queues only the rest (tasks already queued are skipped)"
    try:
        # A new connection: the submit's own may have stopped in the middle of a reply.
        now = Queue(args.cfg.client(timeout=5.0, retries=0), args.cfg.namespace).counts()
    except RedisError:
        return f"some of the {len(tasks)} task(s) of {name} may be queued; {again}"
    return (f"{now['total'] - before} new task(s) of the {len(tasks)} in {name} were queued "
            f"before it stopped; {again}")


# -- status, watch, wait -----------------------------------------------------------------------
def _status_doc(queue: Queue) -> dict[str, int]:
    """Counts, live workers, and what keeps tasks from moving that whoever watches the queue
    should hear about: queued tasks no live worker could ever take, and running tasks of
    workers no longer heard from (they wait for a live worker to be reaped back)."""
    doc = queue.counts()
    live, doc["stranded"] = queue.liveness()
    doc["workers_alive"] = len(live)
    doc["unplaceable"] = queue.unplaceable(live) if doc["todo"] else 0
    return doc


def cmd_status(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CliError(f"--limit must be a positive number of tasks, got {args.limit}",
                       EXIT_BAD_INPUT)
    if args.limit > MAX_LIST:
        raise CliError(f"--limit must be at most {MAX_LIST:,}, got {args.limit} (to list "
                       f"more, use `distcomp export --state STATE`)", EXIT_BAD_INPUT)
    queue = _connect(args)
    queue.reap()
    doc: dict[str, Any] = _status_doc(queue)
    if args.state:
        ids = queue.ids_in_state(args.state, args.limit)
        tasks = []
        for tid in ids:
            t = queue.task(tid) or {}
            tasks.append({"id": tid, "state": t.get("state"), "priority": int(t.get("priority", 0)),
                          "worker": t.get("worker") or None, "attempt": int(t.get("attempt", 0)),
                          "reason": t.get("reason") or None, "params": t.get("params")})
        doc["tasks"] = tasks
    if args.json:
        print(json.dumps(doc, sort_keys=True))
        return 0
    print("  ".join(f"{s} {doc[s]}" for s in STATES)
          + f"  (total {doc['total']}, workers alive {doc['workers_alive']})")
    if doc["todo"] and not doc["workers_alive"]:
        print("note: no live worker; queued tasks wait until one starts (`distcomp worker`, "
              "or the distcomp-worker service)")
    if doc["unplaceable"]:
        print(f"note: {doc['unplaceable']} queued task(s) need more memory or cores than any "
              f"live worker offers; they wait for a bigger worker (or `distcomp cancel` them)")
    if doc["stranded"]:
        print(f"note: {doc['stranded']} running task(s) belong to workers no longer heard from "
              f"(`distcomp workers`); they go back to the queue once a live worker is heard "
              f"from (within one lease term)")
    for t in doc.get("tasks", []):
        extra = f" on {t['worker']}" if t["worker"] else ""
        why = f"  [{t['reason']}]" if t["reason"] and t["state"] != "finished" else ""
        print(f"{t['id']}  {t['state']:<8} p{t['priority']:<4} a{t['attempt']}{extra}  "
              f"{_short(t['params'], 60)}{why}")
    return 0


def _short(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def _progress_line(doc: dict[str, int], rate: float) -> str:
    done = doc["finished"] + doc["failed"]
    total = max(doc["total"], 1)
    width = 30
    filled = int(width * done / total)
    remaining = doc["todo"] + doc["running"]
    eta = f"{remaining / rate:,.0f}s" if rate > 0 else "?"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{doc['total']} "
            f"({100 * done / total:.1f}%)  running {doc['running']}  failed {doc['failed']}  "
            f"{rate:,.1f} tasks/s  ETA {eta}")


class _Outage:
    """Lets a long-running command ride out a Redis restart: it was reachable at the start, so
    a lost connection is waited out (and said once on stderr) instead of ending the command."""

    def __init__(self) -> None:
        self.since: float | None = None

    def poll(self, queue: Queue) -> dict[str, int] | None:
        try:
            queue.reap()
            doc = _status_doc(queue)
        except ConnectError as exc:
            if self.since is None:
                self.since = time.monotonic()
                print(f"distcomp: lost the connection to Redis ({exc}); retrying",
                      file=sys.stderr, flush=True)
            return None
        if self.since is not None:
            print(f"distcomp: Redis is reachable again after "
                  f"{time.monotonic() - self.since:.1f}s", file=sys.stderr, flush=True)
            self.since = None
        return doc


def _check_seconds(args: argparse.Namespace) -> None:
    """``--interval`` must be positive and ``--timeout`` (where there is one) not negative,
    both finite and at most ``MAX_SECONDS``."""
    if not args.interval > 0:
        raise CliError(f"--interval must be a positive number of seconds, got {args.interval:g}",
                       EXIT_BAD_INPUT)
    if not getattr(args, "timeout", 0) >= 0:
        raise CliError(f"--timeout must be 0 (none) or a positive number of seconds, got "
                       f"{args.timeout:g}", EXIT_BAD_INPUT)
    for opt in ("interval", "timeout"):
        if getattr(args, opt, 0) > MAX_SECONDS:
            raise CliError(f"--{opt} must be at most {MAX_SECONDS} seconds (a year), got "
                           f"{getattr(args, opt):g}", EXIT_BAD_INPUT)


def cmd_watch(args: argparse.Namespace) -> int:
    _check_seconds(args)
    queue = _connect(args)
    tty = sys.stdout.isatty()
    window: list[tuple[float, int]] = []
    try:
        outage = _Outage()
        while True:
            doc = outage.poll(queue)
            if doc is None:
                time.sleep(args.interval)
                continue
            now = time.monotonic()
            window.append((now, doc["finished"] + doc["failed"]))
            window = [w for w in window if now - w[0] <= 30] or window[-1:]
            span = window[-1][0] - window[0][0]
            rate = (window[-1][1] - window[0][1]) / span if span > 0 else 0.0
            line = _progress_line(doc, rate) + f"  workers {doc['workers_alive']}"
            if doc["unplaceable"]:
                line += f"  ({doc['unplaceable']} need a bigger worker)"
            print("\r" + line + "\033[K" if tty else line, end="" if tty else "\n", flush=True)
            if doc["todo"] + doc["running"] == 0:
                if tty:
                    print()  # what comes next (the prompt) starts on a line of its own
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        if tty:
            print()
        raise
    return 0


class _Drained:
    """Sleeps until the queue announces that nothing is left todo or running, or a timeout,
    whichever comes first. Without a subscription (Redis unreachable, or an ACL user without
    pub/sub channels) it just sleeps; after a lost connection it subscribes again."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.sub: Any = None
        self.refused = False

    def wait(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        if not self.refused:
            try:
                if self.sub is None:
                    self.sub = self.queue.notices("drained")
                self.sub.get_message(timeout=timeout)  # a notice or the confirmation
                return
            except ConnectError:
                self.close()
            except ResponseError:
                self.close()
                self.refused = True
        time.sleep(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        if self.sub is not None:
            try:
                self.sub.close()
            except (ConnectError, OSError):
                pass
            self.sub = None


def cmd_wait(args: argparse.Namespace) -> int:
    _check_seconds(args)
    return _report_drained(args, _wait_drained(args, _connect(args)))


def _report_drained(args: argparse.Namespace, doc: dict[str, int]) -> int:
    """Say that the queue drained; exit 1 when it holds failed tasks."""
    human = f"queue drained: {doc['finished']} finished, {doc['failed']} failed"
    if doc["failed"]:
        human += (" (which and why: `distcomp status --state failed`, a task's output: "
                  "`distcomp show ID`; run them again: `distcomp retry --all`)")
    _emit(args, doc, human)
    return EXIT_OPERATIONAL if doc["failed"] else 0


def _wait_drained(args: argparse.Namespace, queue: Queue) -> dict[str, int]:
    """Block until no task is todo or running; the finished and failed counts then."""
    deadline = time.monotonic() + args.timeout if args.timeout else None
    outage = _Outage()
    drained = _Drained(queue)
    noted = False
    try:
        while True:
            doc = outage.poll(queue)
            if doc is not None and doc["todo"] + doc["running"] == 0:
                break
            if doc is not None and doc["todo"] and not doc["workers_alive"] and not noted:
                # Said once: waiting in silence, the user could not tell it from slow work.
                print("distcomp: note: no live worker; the queued tasks wait until one starts "
                      "(`distcomp worker`, or the distcomp-worker service)", file=sys.stderr,
                      flush=True)
                noted = True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                if doc is None:
                    raise CliError(f"timed out after {args.timeout:g}s: cannot reach Redis at "
                                   f"{args.cfg.redacted_url()}")
                stuck = (f"; {doc['unplaceable']} of the todo need more memory or cores than "
                         f"any live worker offers") if doc["unplaceable"] else ""
                if doc["todo"] and not doc["workers_alive"]:
                    stuck += "; no worker is alive to take the todo"
                if doc["stranded"]:
                    stuck += (f"; {doc['stranded']} of the running belong to workers no longer "
                              f"heard from, and go back to the queue once a live worker is")
                raise CliError(f"timed out after {args.timeout:g}s with {doc['todo']} todo "
                               f"and {doc['running']} running{stuck}")
            # Checks every interval still run: they reap the tasks of dead workers.
            drained.wait(args.interval if deadline is None
                         else min(args.interval, deadline - now))
    finally:
        drained.close()
    return {"finished": doc["finished"], "failed": doc["failed"]}


# -- workers, show -----------------------------------------------------------------------------
def _worker_state(w: dict[str, Any]) -> str:
    return "alive" if w["alive"] else "stopped" if w["stopped"] else "lost"


def cmd_workers(args: argparse.Namespace) -> int:
    queue = _connect(args)
    rows = queue.workers()
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    if not rows:
        print("no workers have registered yet")
        return 0
    print(f"{'NAME':<16} {'STATE':<7} {'HB AGE':>6} {'RUN':>4} {'CORES':>11} {'MEMORY':>19} "
          f"{'DONE':>7}")
    for w in rows:
        age = "-" if w["heartbeat_age"] is None else f"{w['heartbeat_age']:.1f}s"
        mem = f"{w['mem_used'] / 2**30:.1f}/{w['mem_total'] / 2**30:.1f} GiB"
        print(f"{w['name']:<16} {_worker_state(w):<7} {age:>6} {w['running']:>4} "
              f"{w['cores_used']:>5g}/{w['cores']:<5g} {mem:>19} {w['done']:>7}")
    for w in rows:
        if w["alive"] and w["fault"]:
            print(f"{w['name']} cannot start tasks: {w['fault']}; it claims none for a while, "
                  f"and what it claimed is back in the queue")
        if w["reserving"]:
            print(f"{w['name']} waits for room for task {w['reserving']}, passed over for smaller "
                  f"ones: it takes nothing ranked below it meanwhile")
    if any(_worker_state(w) == "lost" for w in rows):
        print("lost: the lease expired without a clean stop (crashed, killed or cut off from "
              "Redis); its tasks go back to the queue")
    return 0


def _resolve(queue: Queue, prefix: str) -> str:
    ids = queue.resolve(prefix)
    if not ids:
        raise CliError(f"unknown task id {prefix!r} (see `distcomp status --state todo` for ids)")
    if len(ids) > 1:
        raise CliError(f"task id prefix {prefix!r} is ambiguous: matches {len(ids)} tasks")
    return ids[0]


def _count(raw: str) -> int:
    return int(raw or 0)


def _size(raw: str) -> float:
    return float(raw or 0)


def _maybe_int(raw: str) -> int | None:
    return int(raw) if raw else None


def _maybe_float(raw: str) -> float | None:
    return float(raw) if raw else None


def _mib(raw: str) -> float | None:
    return round(int(raw) / 2**20, 1) if raw else None


def _iso(raw: str) -> str | None:
    if not raw:
        return None
    when = datetime.fromtimestamp(float(raw), timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# What show and export print under each name: the stored field and its JSON type (counts 0 and
# sizes 0.0 when absent; exit code, peak memory and times null until known; text "" if absent).
_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    **{k: (k, _count) for k in ("priority", "attempt", "failures", "evictions", "max_retries")},
    **{k: (k, _maybe_float) for k in ("submitted", "started", "ended", "wall_s", "timeout")},
    "min_dram_gb": ("dram_gb", _size), "min_cpu": ("cpu", _size),
    "exit_code": ("exit_code", _maybe_int), "peak_mem": ("peak_mem", _maybe_int),
    "peak_mem_mb": ("peak_mem", _mib),
}
Plan = list[tuple[str, str, Callable[[str], Any]]]


def _plan(keys: Sequence[str], **typed: Callable[[str], Any]) -> Plan:
    """How to read ``keys`` from a task hash, worked out once for a whole export."""
    plan = []
    for key in keys:
        stored, convert = _FIELDS.get(key, (key, str))
        plan.append((key, stored, typed.get(key, convert)))
    return plan


def _typed(task: dict[str, str], plan: Plan) -> dict[str, Any]:
    return {key: convert(task.get(stored, "")) for key, stored, convert in plan}


def cmd_show(args: argparse.Namespace) -> int:
    queue = _connect(args)
    tid = _resolve(queue, args.id)
    task = queue.task(tid) or {}
    doc: dict[str, Any] = {"id": tid}
    doc.update(_typed(task, _plan((
        "state", "type", "params", "priority", "worker", "reserved_by", "attempt", "exit_code",
        "reason",
        "started", "ended", "wall_s", "peak_mem", "failures", "evictions", "host", "cwd",
        "timeout", "max_retries", "submitted", "stdout_tail", "stderr_tail", "min_dram_gb",
        "min_cpu"))))
    doc["env"] = json.loads(task["env"]) if task.get("env") else {}
    if doc["reserved_by"] and not queue.holds_reservation(doc["reserved_by"], tid):
        doc["reserved_by"] = ""
    if args.json:
        print(json.dumps(doc, sort_keys=True))
        return 0
    for key, value in doc.items():
        if key in ("stdout_tail", "stderr_tail") or value in ("", None, {}):
            continue
        if key in ("started", "ended", "submitted"):
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        elif key == "peak_mem":
            value = f"{value / 2**20:.1f} MiB"
        print(f"{key:<12} {value}")
    for key in ("stdout_tail", "stderr_tail"):
        if doc[key]:
            print(f"--- {key} ---")
            print(doc[key].rstrip("\n"))
    return 0


# -- export ------------------------------------------------------------------------------------
EXPORT_COLUMNS = ("id", "state", "type", "priority", "min_dram_gb", "min_cpu", "params",
                  "attempt", "worker", "host", "exit_code", "reason", "submitted", "started",
                  "ended", "wall_s", "peak_mem_mb", "evictions", "failures")


@contextlib.contextmanager
def _replaced_whole(path: str | None) -> Iterator[TextIO]:
    """Standard output, or FILE written whole (distcomp.output): an export that fails
    half-way leaves no partial file where a whole one is expected."""
    if path is None:
        yield sys.stdout
        return
    try:
        with replaced_whole(path) as out:
            yield out
    except OutputError as exc:
        code = EXIT_BAD_INPUT if exc.usage else EXIT_OPERATIONAL
        raise CliError(str(exc), code) from None


def cmd_export(args: argparse.Namespace) -> int:
    times = dict.fromkeys(("submitted", "started", "ended"), _iso) if args.format == "csv" else {}
    plan = _plan(EXPORT_COLUMNS[1:], **times)
    per_state = dict.fromkeys(STATES, 0)
    output = None if args.output == "-" else args.output
    with _replaced_whole(output) as out:
        queue = _connect(args)
        if args.format == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(EXPORT_COLUMNS)
        for tid, task in queue.iter_tasks([stored for _, stored, _ in plan], args.state):
            row = _typed(task, plan)
            per_state[row["state"]] += 1
            if args.format == "csv":
                writer.writerow((tid, *row.values()))
            else:
                row["id"] = tid
                out.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    if output:
        counts = ", ".join(f"{s} {n}" for s, n in per_state.items())
        print(f"{output}: {sum(per_state.values())} task(s) ({counts})")
    return 0


# -- operator actions --------------------------------------------------------------------------
def _check_ids(args: argparse.Namespace) -> None:
    """Task ids or ``--all``, exactly one of them; checked before connecting, as bad usage."""
    if args.all and args.ids:
        raise CliError("give task ids or --all, not both", EXIT_BAD_INPUT)
    if not args.all and not args.ids:
        raise CliError("give task ids, or --all", EXIT_BAD_INPUT)


def _ids(queue: Queue, args: argparse.Namespace, *states: str) -> list[str]:
    """The tasks named (by a unique prefix each), or with ``--all`` every task in ``states``."""
    if args.all:
        return [tid for state in states for tid in queue.iter_ids_in_state(state)]
    return [_resolve(queue, i) for i in args.ids]


def cmd_retry(args: argparse.Namespace) -> int:
    _check_ids(args)
    queue = _connect(args)
    ids = _ids(queue, args, "failed")
    n = queue.retry(ids)
    others = len(set(ids)) - n
    _emit(args, {"retried": n}, f"{n} failed task(s) back in the queue" + (
        f"; {others} named were not failed (todo, running or finished), left as they were"
        if others else ""))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _check_ids(args)
    queue = _connect(args)
    ids = queue.active_ids() if args.all else _ids(queue, args)
    done, flagged = queue.cancel(ids)
    ended = len(set(ids)) - done - flagged
    _emit(args, {"cancelled": done + flagged, "queued": done, "running": flagged},
          f"cancelled {done} queued task(s); {flagged} running task(s) will be killed" + (
              f"; {ended} named had already ended (finished, failed or cancelled before)"
              if ended else ""))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    if not args.worker.strip():
        raise CliError("--worker is empty: give a worker's name (see `distcomp workers`)",
                       EXIT_BAD_INPUT)
    queue = _connect(args)
    n = queue.requeue_worker(args.worker, f"requeued by operator from worker {args.worker}")
    if not n and not queue.knows_worker(args.worker):
        raise CliError(f"no worker named {args.worker!r} in namespace {queue.ns!r} (see "
                       f"`distcomp workers`)", EXIT_BAD_INPUT)
    _emit(args, {"requeued": n}, f"{n} task(s) of {args.worker} back in the queue")
    return 0


def cmd_stop_workers(args: argparse.Namespace) -> int:
    queue = _connect(args)
    queue.stop_workers()
    _emit(args, {"stop_requested": True},
          "asked every running worker to finish its tasks and exit")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    if not args.yes:
        raise CliError(f"purge deletes every key of namespace {args.cfg.namespace!r}; "
                       f"add --yes to confirm", EXIT_BAD_INPUT)
    queue = _connect(args)
    n = queue.purge()
    _emit(args, {"deleted_keys": n}, f"deleted {n} key(s) of namespace {queue.ns!r}")
    return 0


# -- worker ------------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    import logging  # only the worker logs: the other commands start without it

    from .worker import Worker

    wc = args.cfg.worker
    for opt in ("name", "results_dir", "workdir", "python", "cores", "max_tasks",
                "default_timeout", "heartbeat_ttl", "eviction_budget", "kill_grace", "idle_poll",
                "own_cgroup"):
        value = getattr(args, opt)
        if value is not None:
            setattr(wc, opt, value)
    if args.overcommit is not None:
        wc.overcommit = parse_overcommit(args.overcommit, "--overcommit")
    for opt in ("memory_limit", "memory_reserve", "evict_below"):
        value = getattr(args, opt)
        if value is not None:
            setattr(wc, opt, parse_size(value, f"--{opt.replace('_', '-')}"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A Redis call that hangs (a silent network cut) stalls the loop, and with it memory
    # sampling and eviction: the worker gives each call a few seconds, not the CLI's 30.
    timeout = min(5.0, max(1.0, wc.heartbeat_ttl / 4))
    client = args.cfg.client(timeout=timeout, connect_timeout=timeout, retries=1, backoff=0.0)
    client.ping()
    queue = Queue(client, args.cfg.namespace)
    return Worker(args.cfg, queue, drain=args.drain, exit_when_empty=args.exit_when_empty).run()


# -- parser ------------------------------------------------------------------------------------
# In a word with an '@': a scheme and what follows the last '@' are shown, the rest is masked.
# Any word, not only one with '://': a URL mistyped without it may hold a password too.
_USER_INFO = re.compile(r"(\w+:/*)?[^\s'\"]*@")
_OPTION_VALUE = re.compile(r"(?<!\S)(--?[\w-]+)=\S*")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line like every other error, with any password in a URL masked:
    argparse would print the usage block and echo the arguments it did not take.
    Each is made with ``allow_abbrev=False``: ``--password SECRET`` would be taken as
    ``--password-file`` and its error would show the secret as a file name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The destination of its command and its commands' parsers by name, once it has some.
        self.commands: tuple[str, dict[str, argparse.ArgumentParser]] | None = None

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        self.commands = (kwargs["dest"], action.choices)
        return action

    def error(self, message: str) -> NoReturn:
        message = _USER_INFO.sub(lambda m: f"{m.group(1) or ''}***@", message)
        if message.startswith("unrecognized arguments: "):
            # an option nobody knows may still carry a secret: --pw=SECRET shows as --pw=***
            message = _OPTION_VALUE.sub(r"\1=***", message)
        hint = "`distcomp --help`" if self.prog == "distcomp" else f"`{self.prog} --help`"
        self.exit(EXIT_BAD_INPUT, f"distcomp: error: {one_line(message)} (see {hint})\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse's, but an argument no command takes is refused by its command's parser,
        whose help lists what it does take; argparse's own would point at ``distcomp --help``."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            parser: argparse.ArgumentParser = self
            while isinstance(parser, _Parser) and parser.commands is not None:
                dest, commands = parser.commands
                if getattr(parsed, dest, None) not in commands:
                    break
                parser = commands[getattr(parsed, dest)]
            parser.error("unrecognized arguments: " + " ".join(extra))
        return parsed


# Spellings people try for a password option: none exists, and argparse would echo the value
# given with one (among the arguments it did not take, or as an invalid command name).
_PASSWORD_OPTIONS = ("--password", "--passwd", "--pass", "--redis-password", "--requirepass",
                     "--auth")


class _NoPassword(argparse.Action):
    """Refuses a password option (``_PASSWORD_OPTIONS``) without showing its value, and says
    what to do instead."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error(f"there is no {option_string} option (a password on the command line is "
                     f"seen by every user of the machine): give --password-file FILE or set "
                     f"DISTCOMP_REDIS_PASSWORD")


def _global_options(p: argparse.ArgumentParser, default: Any = None) -> None:
    """Which Redis and namespace. Each command takes them too, as people type them after it;
    there ``default`` is SUPPRESS, so one left out keeps the value given before the command
    and one given after it wins."""
    p.add_argument("--config", default=default,
                   help="INI config file (default: $DISTCOMP_CONFIG, then "
                        "/etc/distcomp/distcomp.conf if present)")
    p.add_argument("--redis", default=default,
                   help="Redis URL (default: $DISTCOMP_REDIS_URL, the config file, then "
                        "redis://127.0.0.1:6379/0)")
    p.add_argument("--password-file", default=default, help="file holding the Redis password")
    p.add_argument(*_PASSWORD_OPTIONS, action=_NoPassword, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--namespace", default=default,
                   help="key prefix, to share one Redis (default: $DISTCOMP_NAMESPACE, the "
                        "config file, then distcomp)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="distcomp", allow_abbrev=False,
        description="Queue and run bags of independent jobs on a cluster (Redis-backed).")
    p.add_argument("--version", action="version", version=f"distcomp {__version__}")
    _global_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str,
                json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        sp.set_defaults(func=func)
        _global_options(sp, argparse.SUPPRESS)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    sp = command("submit", cmd_submit, "queue the tasks of a taskfile (checked whole first: "
                 "one invalid line queues nothing; an interrupted submit is safe to run again)")
    sp.add_argument("file", help="taskfile, or - for standard input")
    sp.add_argument("--skip-invalid", action="store_true",
                    help="submit the valid lines even if some are invalid (still reported)")
    sp.add_argument("--wait", action="store_true",
                    help="then block until no task is todo or running, as `distcomp wait` does")
    sp.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    sp.add_argument("--interval", type=float,
                    help="with --wait: seconds between checks (default 1)")

    sp = command("status", cmd_status, "queue counts, optionally the tasks of one state")
    sp.add_argument("--state", choices=STATES, help="list tasks in this state")
    sp.add_argument("--limit", type=int, default=50, help="how many to list (default 50)")

    sp = command("watch", cmd_watch, "live progress bar, rate and ETA until the queue is empty",
                 json_flag=False)
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between updates")

    sp = command("wait", cmd_wait, "block until no task is todo or running")
    sp.add_argument("--timeout", type=float, default=0, help="give up after this many seconds")
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between checks")

    command("workers", cmd_workers, "workers with liveness and load")

    sp = command("show", cmd_show, "one task: spec, state, result and output tails")
    sp.add_argument("id", help="task id (a unique prefix is enough)")

    sp = command("export", cmd_export, "every task as a CSV or JSON-lines row: the index of "
                 "the results", json_flag=False)
    sp.add_argument("--state", action="append", choices=STATES,
                    help="only tasks in this state (repeatable; default every task)")
    sp.add_argument("--format", choices=("csv", "jsonl"), default="csv",
                    help="csv (a header, times in ISO 8601 UTC) or jsonl (one JSON object per "
                         "line, times in seconds since the epoch); default csv")
    sp.add_argument("-o", "--output", metavar="FILE",
                    help="write FILE instead of standard output (-: standard output); a "
                         "regular file is replaced whole once complete")

    sp = command("retry", cmd_retry, "put failed tasks back in the queue")
    sp.add_argument("ids", nargs="*")
    sp.add_argument("--all", action="store_true", help="every failed task")

    sp = command("cancel", cmd_cancel, "cancel queued tasks; running ones are killed")
    sp.add_argument("ids", nargs="*")
    sp.add_argument("--all", action="store_true", help="every queued and running task")

    sp = command("requeue", cmd_requeue, "put the running tasks of one worker back in the queue")
    sp.add_argument("--worker", required=True)

    command("stop-workers", cmd_stop_workers,
            "ask every worker to finish its running tasks and exit (exit status 10)")

    sp = command("purge", cmd_purge, "delete every key of this namespace (not the database)")
    sp.add_argument("--yes", action="store_true", help="confirm")

    sp = command("worker", cmd_worker, "run the worker daemon on this node", json_flag=False)
    sp.add_argument("--name", help="worker name (default: config, then host name)")
    sp.add_argument("--results-dir", help="where task output files go (shared mount)")
    sp.add_argument("--workdir", help="default working directory of tasks")
    sp.add_argument("--python", help="interpreter for python tasks")
    sp.add_argument("--cores", type=float, help="cores to offer (default: usable CPUs)")
    sp.add_argument("--memory-limit", help="cap memory capacity, e.g. 3G")
    sp.add_argument("--memory-reserve", help="memory left for the OS, e.g. 512M")
    sp.add_argument("--evict-below", help="evict when available memory drops below, e.g. 256M")
    sp.add_argument("--max-tasks", type=int, help="at most this many tasks at once")
    sp.add_argument("--default-timeout", type=float, help="seconds, for tasks without one")
    sp.add_argument("--heartbeat-ttl", type=float, help="lease time-to-live in seconds")
    sp.add_argument("--eviction-budget", type=int, help="evictions before a task fails")
    sp.add_argument("--kill-grace", type=float, help="seconds between TERM and KILL")
    sp.add_argument("--idle-poll", type=float,
                    help="most seconds between claims while nothing comes (new tasks are "
                         "announced and claimed at once)")
    sp.add_argument("--overcommit", metavar="F|auto",
                    help="start this many times as many tasks as their learned mean peak fits "
                         "(default 1; 0.25-4): above 1 more start and more are evicted; auto: "
                         "from how much of their peak such tasks hold over their run")
    sp.add_argument("--own-cgroup", action="store_true", default=None,
                    help="the worker's cgroup holds only it and its tasks (its systemd unit): "
                         "processes there that left their task's session count toward it, "
                         "and are killed once it ends")
    sp.add_argument("--drain", action="store_true",
                    help="on SIGTERM let running tasks finish instead of requeueing them")
    sp.add_argument("--exit-when-empty", action="store_true",
                    help="exit once the queue has nothing todo or running")
    sp.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])

    from .cloudlab import add_inventory_command
    add_inventory_command(sub)
    return p


def _complain(text: str) -> None:
    print(f"distcomp: error: {one_line(text)}", file=sys.stderr)


def _describe_redis_error(cfg: Config, exc: Exception) -> str:
    url = cfg.redacted_url()
    text = str(exc)
    if isinstance(exc, AuthError) and not cfg.password or "NOAUTH" in text:
        return (f"Redis at {url} requires a password: set DISTCOMP_REDIS_PASSWORD, "
                f"--password-file or [redis] password_file")
    if isinstance(exc, AuthError) or "WRONGPASS" in text:
        return (f"Redis at {url} refused the password (check DISTCOMP_REDIS_PASSWORD, "
                f"--password-file or the config file)")
    if "WRONGTYPE" in text:
        return (f"Redis at {url} holds keys under namespace {cfg.namespace!r} that are not "
                f"distcomp's: choose another --namespace")
    if isinstance(exc, ConnectError):
        return f"cannot reach Redis at {url}: {text.rstrip('.')}"
    return f"Redis at {url} answered with an error: {text}"


def main(argv: list[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A file name that is not UTF-8 (kept as surrogates) prints escaped, not as a crash
        # after the work is done.
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if sys.stdout is None:
        # Started with its standard output closed (`1>&-`): what a command prints would be lost
        # after the work is done. The worker prints nothing there and runs on.
        if args.command != "worker":
            print("distcomp: error: standard output is closed: run it with an open one (> "
                  "/dev/null to throw the output away)", file=sys.stderr)
            return EXIT_BAD_INPUT
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - open as long as the process
    try:
        if args.command != "inventory":
            args.cfg = load(args.config, args.redis, args.password_file, args.namespace)
        code = args.func(args)
        sys.stdout.flush()  # a write error shows here, as one line, not at exit
        return code
    except CliError as exc:
        _complain(str(exc))
        return exc.code
    except ConfigError as exc:
        _complain(str(exc))
        return EXIT_BAD_INPUT
    except RedisError as exc:
        _complain(_describe_redis_error(args.cfg, exc))
        return EXIT_OPERATIONAL
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # Mostly output that could not be written (a full disk, /dev/full, a file size limit);
        # the worker logs its own with the traceback first.
        where = f"{exc.filename}: " if isinstance(exc.filename, str) else ""
        _complain(f"{where}{exc.strerror or exc}")
        return EXIT_OPERATIONAL
    except KeyboardInterrupt:
        print("distcomp: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
