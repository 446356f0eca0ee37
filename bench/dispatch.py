"""Dispatch speed: N no-op shell tasks end to end, distcomp vs GNU parallel vs xargs -P.

distcomp: ``distcomp submit`` of a taskfile, then one ``distcomp worker --exit-when-empty``
with ``--cores C --max-tasks C`` and tasks declaring ``min_cpu`` 1, so C tasks run at once;
the clock runs from the start of ``submit`` to the worker's exit and every task must be
recorded as finished. The peers run the same command lines with the same concurrency, each the
way it runs a line: ``parallel -jC`` and ``xargs -P C bash -c`` through bash. distcomp execs a
line made of plain words itself, as bash would (``distcomp.runner``), so a fourth row shows the
fork+exec ceiling: ``xargs -P C`` exec'ing the same program with the same arguments, no shell.
The rounds alternate the tools so that background load on the machine hits them alike; the
table shows each tool's median.

A second part runs ``sleep 0.05`` tasks at concurrency 32: useful concurrency is
``N * 0.05 s / makespan`` (32 would be perfect) and per-task overhead is what each slot spent
beyond the 0.05 s sleep. distcomp runs identical lines once, so the lines are made unique by
digits past the eighth decimal (``sleep 0.0500000017``: 1.7 ns more).

distcomp keeps every task's stdout and stderr in two files; the peers' output goes into pipes
this script reads into memory. So that both keep output in memory, the worker's results
directory is on tmpfs (/dev/shm) by default; ``--results-dir`` puts it elsewhere, e.g. on disk
to include the file system's cost of creating two files per task.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DISTCOMP, RedisServer, child_env, ensure_tools, run_timed, table, write_result

SLEEP_S = 0.05


def run_distcomp(server: RedisServer, commands: list[str], conc: int, ns: str,
                 work: Path, results_root: Path) -> dict[str, Any]:
    taskfile = work / f"{ns}.tasks"
    taskfile.write_text("".join(f"shell:0:0:1:{c}\n" for c in commands))
    results = results_root / f"{ns}-results"
    base = [*DISTCOMP, "--redis", server.url, "--namespace", ns]
    env = child_env()
    t0 = time.perf_counter()
    sub = subprocess.run([*base, "submit", str(taskfile), "--json"], env=env, check=True,
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
    return {"seconds": total, "submit_s": t_submit, "run_s": total - t_submit,
            "added": added, "finished": status["finished"], "failed": status["failed"],
            "lost": len(commands) - status["finished"]}


def run_parallel(commands: list[str], conc: int, work: Path) -> dict[str, Any]:
    cmdfile = work / "parallel.cmds"
    cmdfile.write_text("".join(c + "\n" for c in commands))
    env = child_env(PARALLEL_SHELL="/bin/bash", PARALLEL_HOME=str(work / "parallel-home"))
    secs, proc = run_timed(["parallel", "--will-cite", f"-j{conc}", "-a", str(cmdfile)],
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


TOOLS = ("distcomp", "parallel", "xargs", "xargs-exec")


def measure(server: RedisServer, commands: list[str], conc: int, rounds: int, tag: str,
            work: Path, results_root: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in TOOLS}
    for r in range(rounds):
        order = list(TOOLS[r % len(TOOLS):] + TOOLS[:r % len(TOOLS)])
        for tool in order:
            if tool == "distcomp":
                res = run_distcomp(server, commands, conc, f"{tag}{r}", work, results_root)
            elif tool == "parallel":
                res = run_parallel(commands, conc, work)
            elif tool == "xargs":
                res = run_xargs(commands, conc, work)
            else:
                res = run_xargs_exec(commands, conc, work)
            res["tasks_per_s"] = len(commands) / res["seconds"]
            runs[tool].append(res)
            print(f"  round {r + 1}/{rounds} {tag} {tool:<10} {res['seconds']:7.2f} s  "
                  f"{res['tasks_per_s']:8.0f} tasks/s", flush=True)
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        out[tool] = {"seconds": secs, "tasks_per_s": n / secs, "lost": sum(r["lost"] for r in rs),
                     "runs": rs}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10_000, help="no-op tasks (default 10000)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--sleep-tasks", type=int, default=3_000,
                    help="tasks of the sleep 0.05 part (default 3000)")
    ap.add_argument("--sleep-concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    ap.add_argument("--results-dir", help="where the worker writes task output (default: a "
                    "temporary directory on /dev/shm, else beside the other temporary files)")
    ap.add_argument("--out", help="result file (default bench/results/dispatch-<time>.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tasks, args.sleep_tasks, args.rounds = 200, 100, 1
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
                                      "sleep", work, results_root), args.sleep_tasks)
    for s in sleep_sum.values():
        s["useful_concurrency"] = args.sleep_tasks * SLEEP_S / s["seconds"]
        s["overhead_ms_per_task"] = 1000 * (s["seconds"] * args.sleep_concurrency
                                            / args.sleep_tasks - SLEEP_S)
    d, p, x, xe = (noop_sum[t]["tasks_per_s"] for t in TOOLS)
    doc = {
        "params": {"tasks": args.tasks, "concurrency": args.concurrency,
                   "sleep_tasks": args.sleep_tasks, "sleep_concurrency": args.sleep_concurrency,
                   "sleep_s": SLEEP_S, "rounds": args.rounds, "smoke": args.smoke,
                   "results_dir_fs": fs,
                   "shell": "parallel and xargs: bash -c; xargs-exec: none; distcomp: none "
                            "for these plain lines (bash would only exec them)"},
        "noop": noop_sum,
        "sleep": sleep_sum,
        "ratios": {"distcomp_vs_parallel": d / p, "distcomp_vs_xargs": d / x,
                   "distcomp_vs_xargs_exec": d / xe},
        "distcomp": {"tasks_per_s": d, "lost": noop_sum["distcomp"]["lost"]
                     + sleep_sum["distcomp"]["lost"]},
        "targets": {"distcomp_tasks_per_s>=1000": d >= 1000,
                    "distcomp_vs_parallel>=2": d / p >= 2,
                    "sleep_useful_concurrency>=0.9*C":
                        sleep_sum["distcomp"]["useful_concurrency"]
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
    path = write_result("dispatch", doc, args.out)
    print(f"\nresult: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
