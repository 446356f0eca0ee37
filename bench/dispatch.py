"""Dispatch speed: N no-op shell tasks end to end, distcomp vs GNU parallel vs xargs -P.

distcomp: ``distcomp submit`` of a taskfile, then one ``distcomp worker --exit-when-empty``
with ``--cores C --max-tasks C`` and tasks declaring ``min_cpu`` 1, so C tasks run at once;
the clock runs from the start of ``submit`` to the worker's exit and every task must be
recorded as finished. The peers run the same command lines with the same concurrency, each the
way it runs a line: ``parallel -jC`` and ``xargs -P C bash -c`` through bash. distcomp execs a
line made of plain words itself, as bash would (``distcomp.runner``), so a fourth row shows the
fork+exec ceiling: ``xargs -P C`` exec'ing the same program with the same arguments, no shell.
``distcomp-daemon`` is distcomp as a cluster runs it: the worker daemon is already up and idle,
and the clock runs from the start of ``distcomp submit`` to the exit of ``distcomp wait``.
The rounds alternate the tools so that background load on the machine hits them alike; the
table shows each tool's median.

A second part runs ``sleep 0.05`` tasks at concurrency 32: useful concurrency is
``N * 0.05 s / makespan`` (32 would be perfect) and per-task overhead is what each slot spent
beyond the 0.05 s sleep. distcomp runs identical lines once, so the lines are made unique by
digits past the eighth decimal (``sleep 0.0500000017``: 1.7 ns more). distcomp's makespan also
holds two Python start-ups (``submit`` and the worker), a fixed cost the peers do not pay
(``distcomp-daemon`` pays one, ``submit``'s, and the exit of ``wait``); its steady state is
read from the task records the worker wrote: useful concurrency between the first task's start
and the last one's end, and the start-up before the first task.

A third part measures pickup as a cluster sees it: a worker daemon already running and idle,
then ``distcomp submit`` of one task; pickup is the time from the start of ``submit`` to the
task's start on the worker (new tasks are announced to idle workers, not polled for).

distcomp keeps every task's stdout and stderr in two files, and so does GNU parallel, which
buffers each job's output in two temporary files until the job ends; xargs' output goes into
pipes this script reads into memory. So that all keep output in memory, the worker's results
directory is on tmpfs (/dev/shm) by default, and parallel's temporary files go to the same file
system (``--tmpdir``; they went to /tmp, on disk here, before 2026-12-07); ``--results-dir``
puts both elsewhere, e.g. on disk to include the file system's cost of creating files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DISTCOMP,
    REPO,
    RedisServer,
    child_env,
    ensure_tools,
    run_timed,
    table,
    write_result,
)

sys.path.insert(0, str(REPO))
from distcomp.queue import Queue

SLEEP_S = 0.05


def cli(server: RedisServer, ns: str) -> list[str]:
    """The ``distcomp`` command line for one namespace of the benchmark's Redis."""
    return [*DISTCOMP, "--redis", server.url, "--namespace", ns]


def taskfile(work: Path, name: str, commands: list[str]) -> Path:
    """The commands as shell tasks that reserve one core each."""
    path = work / f"{name}.tasks"
    path.write_text("".join(f"shell:0:0:1:{c}\n" for c in commands))
    return path


def run_distcomp(server: RedisServer, commands: list[str], conc: int, ns: str,
                 work: Path, results_root: Path, records: bool = False) -> dict[str, Any]:
    """With ``records``, also the steady state from the tasks' own start and end times."""
    tasks = taskfile(work, ns, commands)
    results = results_root / f"{ns}-results"
    base = cli(server, ns)
    env = child_env()
    wall0 = time.time()
    t0 = time.perf_counter()
    sub = subprocess.run([*base, "submit", str(tasks), "--json"], env=env, check=True,
                         capture_output=True, text=True)
    t_submit = time.perf_counter() - t0
    worker = subprocess.run(  # noqa: PLW1510 (its exit status is checked below)
        [*base, "worker", "--name", f"bench-{ns}", "--results-dir", str(results),
         "--cores", str(conc), "--max-tasks", str(conc), "--exit-when-empty",
         "--log-level", "warning"], env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if worker.returncode != 0:
        raise RuntimeError(f"worker exited {worker.returncode}: {worker.stderr[-2000:]}")
    status = json.loads(subprocess.run([*base, "status", "--json"], env=env, check=True,
                                       capture_output=True, text=True).stdout)
    added = json.loads(sub.stdout)["added"]
    shutil.rmtree(results, ignore_errors=True)
    res = {"seconds": total, "submit_s": t_submit, "run_s": total - t_submit,
           "added": added, "finished": status["finished"], "failed": status["failed"],
           "lost": len(commands) - status["finished"]}
    if records:
        queue = server.queue(ns)
        spans = [(float(t["started"]), float(t["ended"])) for t in
                 (queue.task(tid) or {} for tid in queue.iter_ids_in_state("finished"))]
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        res.update(startup_s=first - wall0, active_s=last - first,
                   exit_s=wall0 + total - last)
    return res


@contextlib.contextmanager
def daemon_worker(server: RedisServer, ns: str, results: Path, *args: str) -> Iterator[Queue]:
    """A ``distcomp worker`` left running, as on a cluster node; yields once it is registered
    and stops it (SIGTERM) afterwards."""
    queue = server.queue(ns)
    worker = subprocess.Popen([*cli(server, ns), "worker", "--name", f"bench-{ns}",
                               "--results-dir", str(results), "--log-level", "warning", *args],
                              env=child_env())
    try:
        while queue.workers_alive() == 0:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker of {ns} exited {worker.returncode}")
            time.sleep(0.05)
        yield queue
    finally:
        worker.terminate()
        worker.wait(30)


def run_distcomp_daemon(server: RedisServer, commands: list[str], conc: int, ns: str,
                        work: Path, results_root: Path) -> dict[str, Any]:
    """As a cluster runs: the worker daemon is up and idle, then ``distcomp submit`` and
    ``distcomp wait``; the clock runs from the start of submit to the exit of wait."""
    tasks = taskfile(work, ns, commands)
    base = cli(server, ns)
    env = child_env()
    with daemon_worker(server, ns, results_root / f"{ns}-results", "--cores", str(conc),
                       "--max-tasks", str(conc)):
        t0 = time.perf_counter()
        subprocess.run([*base, "submit", str(tasks)], env=env, check=True,
                       capture_output=True)
        waited = subprocess.run([*base, "wait", "--json"], env=env, capture_output=True,
                                text=True, check=False)
        total = time.perf_counter() - t0
    if waited.returncode != 0:
        raise RuntimeError(f"wait exited {waited.returncode}: {waited.stderr[-2000:]}")
    shutil.rmtree(results_root / f"{ns}-results", ignore_errors=True)
    doc = json.loads(waited.stdout)
    return {"seconds": total, "finished": doc["finished"], "failed": doc["failed"],
            "lost": len(commands) - doc["finished"]}


def run_pickup(server: RedisServer, rounds: int, work: Path, results_root: Path
               ) -> list[dict[str, float]]:
    """An idle worker daemon, then ``distcomp submit`` of one task, ``rounds`` times."""
    base = cli(server, "pickup")
    env = child_env()
    runs = []
    with daemon_worker(server, "pickup", results_root / "pickup-results") as queue:
        for r in range(rounds):
            time.sleep(1.0)  # idle: the worker's last claim came back empty
            tasks = taskfile(work, f"pickup{r}", [f"true pickup {r}"])
            wall0 = time.time()
            t0 = time.perf_counter()
            subprocess.run([*base, "submit", str(tasks)], env=env, check=True,
                           capture_output=True)
            submit_s = time.perf_counter() - t0
            while queue.counts()["finished"] < r + 1:
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError("a submitted task did not start within 60 s")
                time.sleep(0.005)
            tid = queue.ids_in_state("finished")[-1]
            started = float((queue.task(tid) or {})["started"])
            runs.append({"submit_s": submit_s, "pickup_s": started - wall0})
            print(f"  pickup {r + 1}/{rounds}: submit {submit_s:.3f} s, task started "
                  f"{started - wall0:.3f} s after submit began", flush=True)
    return runs


def run_parallel(commands: list[str], conc: int, work: Path, results_root: Path
                 ) -> dict[str, Any]:
    """GNU parallel, its per-job output files where distcomp's results go."""
    cmdfile = work / "parallel.cmds"
    cmdfile.write_text("".join(c + "\n" for c in commands))
    env = child_env(PARALLEL_SHELL="/bin/bash", PARALLEL_HOME=str(work / "parallel-home"))
    secs, proc = run_timed(["parallel", "--will-cite", f"-j{conc}", "--tmpdir",
                            str(results_root), "-a", str(cmdfile)],
                           env=env, capture_output=True, text=True)
    return {"seconds": secs, "failed": proc.returncode, "lost": 0 if proc.returncode == 0
            else proc.returncode}


def run_xargs(commands: list[str], conc: int, work: Path) -> dict[str, Any]:
    cmdfile = work / "xargs.cmds"
    cmdfile.write_text("".join(c + "\n" for c in commands))
    secs, proc = run_timed(["xargs", "-a", str(cmdfile), "-d", "\n", "-n", "1", "-P", str(conc),
                            "bash", "-c"], capture_output=True, text=True)
    return {"seconds": secs, "failed": 0 if proc.returncode == 0 else 1,
            "lost": 0 if proc.returncode == 0 else 1}


def run_xargs_exec(commands: list[str], conc: int, work: Path) -> dict[str, Any]:
    """``xargs -P C PROGRAM`` with each line's arguments: the same programs exec'd directly."""
    programs = {c.split()[0] for c in commands}
    if len(programs) != 1:
        raise ValueError(f"xargs-exec needs one program for every line, got {sorted(programs)}")
    argfile = work / "xargs-exec.args"
    argfile.write_text("".join(c.split(None, 1)[1] + "\n" for c in commands))
    secs, proc = run_timed(["xargs", "-a", str(argfile), "-L", "1", "-P", str(conc),
                            programs.pop()], capture_output=True, text=True)
    return {"seconds": secs, "failed": 0 if proc.returncode == 0 else 1,
            "lost": 0 if proc.returncode == 0 else 1}


TOOLS = ("distcomp", "distcomp-daemon", "parallel", "xargs", "xargs-exec")


def measure(server: RedisServer, commands: list[str], conc: int, rounds: int, tag: str,
            work: Path, results_root: Path, records: bool = False
            ) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in TOOLS}
    for r in range(rounds):
        order = list(TOOLS[r % len(TOOLS):] + TOOLS[:r % len(TOOLS)])
        for tool in order:
            if tool == "distcomp":
                res = run_distcomp(server, commands, conc, f"{tag}{r}", work, results_root,
                                   records)
            elif tool == "distcomp-daemon":
                res = run_distcomp_daemon(server, commands, conc, f"{tag}d{r}", work,
                                          results_root)
            elif tool == "parallel":
                res = run_parallel(commands, conc, work, results_root)
            elif tool == "xargs":
                res = run_xargs(commands, conc, work)
            else:
                res = run_xargs_exec(commands, conc, work)
            res["tasks_per_s"] = len(commands) / res["seconds"]
            runs[tool].append(res)
            print(f"  round {r + 1}/{rounds} {tag} {tool:<15} {res['seconds']:7.2f} s  "
                  f"{res['tasks_per_s']:8.0f} tasks/s", flush=True)
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        out[tool] = {"seconds": secs, "tasks_per_s": n / secs, "lost": sum(r["lost"] for r in rs),
                     "runs": rs}
    return out


def per_task_overhead_ms(seconds: float, args: argparse.Namespace) -> float:
    """What a slot spent per task beyond the sleep, over ``seconds`` of running."""
    return 1000 * (seconds * args.sleep_concurrency / args.sleep_tasks - SLEEP_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10_000, help="no-op tasks (default 10000)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--sleep-tasks", type=int, default=3_000,
                    help="tasks of the sleep 0.05 part (default 3000)")
    ap.add_argument("--sleep-concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pickups", type=int, default=5,
                    help="single-task submits to an idle worker (default 5)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    ap.add_argument("--results-dir", help="where the worker writes task output (default: a "
                    "temporary directory on /dev/shm, else beside the other temporary files)")
    ap.add_argument("--out", help="result file (default bench/results/dispatch-<time>.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tasks, args.sleep_tasks, args.rounds, args.pickups = 200, 100, 1, 2
    ensure_tools(["redis-server", "parallel"])
    noop = [f"true {i}" for i in range(args.tasks)]
    sleepers = [f"sleep {SLEEP_S:.2f}{i:08d}" for i in range(args.sleep_tasks)]
    shm = Path("/dev/shm")
    results_parent = args.results_dir or (str(shm) if shm.is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="distcomp-bench-dispatch-") as tmp, \
            tempfile.TemporaryDirectory(prefix="distcomp-bench-results-",
                                        dir=results_parent) as results_tmp, \
            RedisServer() as server:
        work, results_root = Path(tmp), Path(results_tmp)
        fs = subprocess.run(["stat", "-f", "-c", "%T", results_tmp], check=True,
                            capture_output=True, text=True).stdout.strip()
        print(f"dispatch: worker results in {results_tmp} ({fs})", flush=True)
        print(f"dispatch: {args.tasks} no-op tasks at concurrency {args.concurrency}, "
              f"{args.rounds} round(s)", flush=True)
        noop_sum = summarise(measure(server, noop, args.concurrency, args.rounds, "noop", work,
                                     results_root), args.tasks)
        print(f"dispatch: {args.sleep_tasks} x sleep {SLEEP_S} at concurrency "
              f"{args.sleep_concurrency}", flush=True)
        sleep_sum = summarise(measure(server, sleepers, args.sleep_concurrency, args.rounds,
                                      "sleep", work, results_root, records=True),
                              args.sleep_tasks)
        print(f"dispatch: pickup by an idle worker, {args.pickups} single-task submits",
              flush=True)
        pickups = run_pickup(server, args.pickups, work, results_root)
    for s in sleep_sum.values():
        s["useful_concurrency"] = args.sleep_tasks * SLEEP_S / s["seconds"]
        s["overhead_ms_per_task"] = per_task_overhead_ms(s["seconds"], args)
    runs = sleep_sum["distcomp"]["runs"]
    active = statistics.median(r["active_s"] for r in runs)
    steady = {"active_s": active, "useful_concurrency": args.sleep_tasks * SLEEP_S / active,
              "overhead_ms_per_task": per_task_overhead_ms(active, args),
              "startup_s": statistics.median(r["startup_s"] for r in runs),
              "exit_s": statistics.median(r["exit_s"] for r in runs)}
    sleep_sum["distcomp"]["steady"] = steady
    pickup = {"runs": pickups,
              "median_pickup_s": statistics.median(r["pickup_s"] for r in pickups),
              "max_pickup_s": max(r["pickup_s"] for r in pickups),
              "median_submit_s": statistics.median(r["submit_s"] for r in pickups)}
    d, _, p, x, xe = (noop_sum[t]["tasks_per_s"] for t in TOOLS)
    doc = {
        "params": {"tasks": args.tasks, "concurrency": args.concurrency,
                   "sleep_tasks": args.sleep_tasks, "sleep_concurrency": args.sleep_concurrency,
                   "sleep_s": SLEEP_S, "rounds": args.rounds, "pickups": args.pickups,
                   "smoke": args.smoke,
                   "results_dir_fs": fs,
                   "shell": "parallel and xargs: bash -c; xargs-exec: none; distcomp: none "
                            "for these plain lines (bash would only exec them)"},
        "noop": noop_sum,
        "sleep": sleep_sum,
        "pickup": pickup,
        "ratios": {"distcomp_vs_parallel": d / p, "distcomp_vs_xargs": d / x,
                   "distcomp_vs_xargs_exec": d / xe},
        "distcomp": {"tasks_per_s": d, "lost": noop_sum["distcomp"]["lost"]
                     + sleep_sum["distcomp"]["lost"]},
        "targets": {"distcomp_tasks_per_s>=1000": d >= 1000,
                    "distcomp_vs_parallel>=2": d / p >= 2,
                    "sleep_useful_concurrency>=0.9*C":
                        sleep_sum["distcomp"]["useful_concurrency"]
                        >= 0.9 * args.sleep_concurrency,
                    "sleep_steady_useful_concurrency>=0.9*C":
                        steady["useful_concurrency"] >= 0.9 * args.sleep_concurrency,
                    "sleep_daemon_useful_concurrency>=0.9*C":
                        sleep_sum["distcomp-daemon"]["useful_concurrency"]
                        >= 0.9 * args.sleep_concurrency},
    }
    print()
    print(table(f"no-op tasks: {args.tasks} x `true N`, concurrency {args.concurrency} "
                f"(median of {args.rounds})",
                ["tool", "seconds", "tasks/s", "vs parallel", "vs xargs-exec", "lost"],
                [[t, s["seconds"], s["tasks_per_s"], s["tasks_per_s"] / p,
                  s["tasks_per_s"] / xe, s["lost"]] for t, s in noop_sum.items()]))
    sub = [r["submit_s"] for r in noop_sum["distcomp"]["runs"]]
    print(f"  (distcomp submit alone: median {statistics.median(sub):.2f} s of the total)")
    print()
    print(table(f"{args.sleep_tasks} x `sleep {SLEEP_S}`, concurrency {args.sleep_concurrency}",
                ["tool", "seconds", "tasks/s", "useful concurrency", "overhead ms/task", "lost"],
                [[t, s["seconds"], s["tasks_per_s"], s["useful_concurrency"],
                  s["overhead_ms_per_task"], s["lost"]] for t, s in sleep_sum.items()]))
    print(f"  distcomp steady state (task records, first start to last end): useful "
          f"concurrency {steady['useful_concurrency']:.1f}, overhead "
          f"{steady['overhead_ms_per_task']:.1f} ms/task; before the first task "
          f"{steady['startup_s']:.2f} s (submit + worker start-up), after the last "
          f"{steady['exit_s']:.2f} s")
    print()
    print(f"pickup by an idle worker (submit of one task -> its start), "
          f"{args.pickups} submits: median {pickup['median_pickup_s']:.3f} s, max "
          f"{pickup['max_pickup_s']:.3f} s; the submit command alone: median "
          f"{pickup['median_submit_s']:.3f} s")
    path = write_result("dispatch", doc, args.out)
    print(f"\nresult: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
