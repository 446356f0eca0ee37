"""Memory packing: tasks that grow to a seeded random size, one memory-capped node, five ways.

Each task (bench/memtask.py) grows linearly to a random 100-700 MB over GROW seconds and holds
it HOLD seconds. Every tool runs inside its own cgroup (v1 memory controller) with the same hard
limit, so a tool that overcommits meets the kernel's OOM killer, which is counted:

* ``distcomp``            - declared min_dram_gb 0 (the user did not know); the worker packs
                            by measured memory and evicts the youngest task when memory runs
                            short.
* ``distcomp-overcommit`` - the same with ``--overcommit`` (auto): the worker starts more
                            undeclared tasks than their learned mean peak fits, by how much of
                            their peak finished tasks held over their run (or a fixed factor).
* ``distcomp-static``     - (a) every task declares its true peak: static reservation packing.
* ``parallel``            - (b) GNU parallel ``--memfree`` with ``--retries``.
* ``xargs``               - (c) naive ``xargs -P`` with the same concurrency.

Reported per tool: makespan; mean and peak memory utilisation of the cgroup (sampled every 0.1
s, inactive page cache excluded); attempts killed (evictions by the tool plus kernel OOM kills);
wasted CPU-seconds and task-seconds (what the killed attempts had done); tasks lost. The
distcomp rows run ``--rounds`` times (2), taking turns at going first, and the table shows each
one's median run (of two, the slower) and every run; the peers run once. The lower bound on the
makespan is the workload's memory-seconds (sum of peak * (GROW/2 + HOLD)) divided by the
capacity: nothing packs better than perfectly fluid memory. Next to it, the makespan of ideal
static packing: every task's true peak known and reserved for exactly GROW + HOLD seconds, the
worker's default reserve kept free, first fit in submission order, no overhead at all - what
a packer that reserves declared peaks does with perfect declarations - and of ideal admission by
foresight: every task's size at every age known exactly, a task started as soon as the exact sum
fits at every later instant (``ideal_foresight``); and the ramp bound, under which no schedule
within the worker's room ends (``ramp_bound``; bench/packing_optimum.py solves for the best
schedule). The fluid bound from the memory-seconds the finished attempts really held is
reported too (tasks run slower than designed on a loaded machine).

Right before each run, untimed, the script touches and frees as much memory as the capacity
(``warm_memory``): a VM that hands freed memory back to its host makes the first touch after a
pause cost twice as much, which would slow whichever run comes first after one.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DISTCOMP, MemoryCgroup, RedisServer, child_env, ensure_tools, table, write_result

from distcomp.config import OVERCOMMIT_AUTO, ConfigError, parse_overcommit
from distcomp.worker import check_overcommit

MEMTASK = Path(__file__).resolve().parent / "memtask.py"
TOOLS = ("distcomp", "distcomp-overcommit", "distcomp-static", "parallel", "xargs")
UNDECLARED = ("distcomp", "distcomp-overcommit")
PAGE = 4096


def make_tasks(n: int, seed: int, lo: int, hi: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def worker_room(capacity_mb: int) -> int:
    """What a distcomp worker lets its tasks hold: the capacity minus its default reserve."""
    return capacity_mb - min(max(capacity_mb // 20, 256), 2048, capacity_mb // 4)


def ramp_bound(peaks: list[int], room_mb: int, grow_s: float, hold_s: float) -> float:
    """No schedule that keeps the tasks within ``room_mb`` ends sooner, whatever its start
    times: until the first task ends (GROW seconds in), every task's memory grows linearly from
    0, so their sum is a convex function of time that starts at 0 and is within the room at
    GROW; it stays below the straight line from 0 to the room, and the first GROW seconds hold
    at most half of what they could. Makespan >= memory-seconds / room + GROW / 2."""
    return sum(p * (grow_s / 2 + hold_s) for p in peaks) / room_mb + grow_s / 2


def ideal_static(peaks: list[int], capacity_mb: int, slots: int, life_s: float) -> float:
    """Makespan of reservation packing with exact peaks and no overhead (event simulation)."""
    room, queue, running, used, now = worker_room(capacity_mb), list(peaks), [], 0, 0.0
    while queue or running:
        while len(running) < slots:
            fit = next((i for i, p in enumerate(queue) if used + p <= room), None)
            if fit is None:
                break
            used += queue[fit]
            heapq.heappush(running, (now + life_s, queue.pop(fit)))
        if not running:
            raise ValueError(f"a task of {max(queue)} MB never fits in {room} MB")
        now, peak = heapq.heappop(running)
        used -= peak
    return now


def memory_shape(grow_s: float, hold_s: float, step_s: float) -> list[float]:
    """A task's memory at each step of its life as a share of its peak (bench/memtask.py's
    model: linear growth from 0, then the peak held), from its start to its end, both included.
    At the step it ends a task still holds its peak up to that instant, while one starting then
    holds nothing yet; counted so, the sum at two neighbouring steps bounds the sum everywhere
    between them, and checking the steps is exact."""
    life = max(1, round((grow_s + hold_s) / step_s))
    return [min(1.0, k * step_s / grow_s) if grow_s else 1.0 for k in range(life + 1)]


def ideal_foresight(peaks: list[int], capacity_mb: int, slots: int, grow_s: float,
                    hold_s: float, step_s: float = 0.02, in_order: bool = False) -> float:
    """Makespan when every task's size at every age is known exactly and nothing costs time:
    first fit in order, a task starts as soon as the exact sum of the started tasks and its
    own stays within the worker's room at every step of its life (``step_s`` apart). What
    admission by a perfect memory profile could do; it can still not be fluid, because a
    task's memory cannot move to where there is room. With ``in_order`` no task starts before
    the ones queued ahead of it, as a worker takes undeclared tasks (it cannot tell which of
    them would fit)."""
    room = worker_room(capacity_mb)
    shape = memory_shape(grow_s, hold_s, step_s)
    life = len(shape) - 1
    used = [0.0] * (len(shape) * (len(peaks) + 1))  # MB held at each step, by the started tasks
    queue, ends, now = list(peaks), [], 0

    def fits(peak: int) -> bool:
        return all(used[now + k] + peak * f <= room for k, f in enumerate(shape))

    while queue:
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        while queue and len(ends) < slots:
            fit = next((i for i, p in enumerate(queue[:1] if in_order else queue) if fits(p)),
                       None)
            if fit is None:
                break
            peak = queue.pop(fit)
            for k, f in enumerate(shape):
                used[now + k] += peak * f
            heapq.heappush(ends, now + life)
        if queue and not ends:
            raise ValueError(f"a task of {max(queue)} MB never fits in {room} MB")
        now += 1
    return max(ends, default=0) * step_s


def warm_memory(mb: int) -> float:
    """Touch ``mb`` MB and free it again; the seconds it took. On a VM whose balloon driver
    reports free pages to the host (as on the machine of docs/performance.md), memory freed a
    few seconds ago is handed back, and touching it again costs about twice as much (3,000 MB:
    3.7-5.3 s after a pause, 1.9-2.4 s right after the last touch). Every tool's run starts
    right after the same warm-up, so none starts on colder memory than another; without it, the
    first run after a pause is slowed by the host rather than by the tool."""
    t = time.monotonic()
    buf = bytearray(mb << 20)
    buf[::PAGE] = b"\1" * len(range(0, len(buf), PAGE))
    del buf
    return time.monotonic() - t


def task_args(i: int, peak: int, grow: float, hold: float, log: Path) -> str:
    return (f"{MEMTASK} --peak {peak} --grow {grow} --hold {hold} --log {log} "
            f"--name t{i:04d}")


class Sampler:
    """Samples the cgroup's memory use while a tool runs (the measurement, not a sync)."""

    def __init__(self, cg: MemoryCgroup) -> None:
        self.cg = cg
        self.samples: list[int] = []

    def run_until(self, proc: subprocess.Popen, timeout: float) -> bool:
        """Until the tool has exited and no process is left in its cgroup (xargs, for one,
        gives up after a child is killed but leaves the others running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.samples.append(self.cg.used())
            try:
                proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            if not self.cg.procs():
                return True
            # The tool has exited and its children run on: wait() returns at once, and without
            # this the loop spun, one CPU away from the tasks and a flood of samples.
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        return False


def run_tool(tool: str, peaks: list[int], args: argparse.Namespace, server: RedisServer,
             work: Path, rnd: int) -> dict[str, Any]:
    """One run of ``tool`` over the workload; ``rnd`` keeps each round's queue apart."""
    ns = f"{tool.replace('-', '_')}_{rnd}"  # a distcomp queue's namespace
    log = work / f"{tool}-log"
    log.mkdir()
    limit = args.capacity_mb << 20
    cg = MemoryCgroup(tool, limit)
    py = sys.executable
    cmds = [task_args(i, p, args.grow, args.hold, log) for i, p in enumerate(peaks)]
    env = child_env(PARALLEL_SHELL="/bin/bash", PARALLEL_HOME=str(work / "parallel-home"))
    stderr_path = work / f"{tool}.stderr"
    warm_s = warm_memory(args.capacity_mb)
    try:
        t0 = time.monotonic()
        if tool.startswith("distcomp"):
            lines = []
            for cmd, peak in zip(cmds, peaks):
                gb = 0 if tool in UNDECLARED else (peak + args.python_mb) / 1024
                lines.append(f"python:0:{gb:.4f}:0:{cmd}\n")
            taskfile = work / f"{ns}.tasks"
            taskfile.write_text("".join(lines))
            base = [*DISTCOMP, "--redis", server.url, "--namespace", ns]
            subprocess.run([*base, "submit", str(taskfile)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            argv = [*base, "worker", "--name", f"bench-{ns}", "--results-dir",
                    str(work / f"{ns}-results"), "--cores", "2", "--max-tasks",
                    str(args.concurrency), "--memory-limit", f"{args.capacity_mb}M",
                    "--exit-when-empty", "--log-level", "warning",
                    *shlex.split(args.worker_args)]
            if tool == "distcomp-overcommit":
                argv += ["--overcommit", str(args.overcommit)]
        elif tool == "parallel":
            cmdfile = work / "parallel.cmds"
            cmdfile.write_text("".join(f"{py} {c}\n" for c in cmds))
            argv = ["parallel", "--will-cite", f"-j{args.concurrency}",
                    "--memfree", f"{args.memfree_mb}M", "--retries", str(args.retries),
                    "-a", str(cmdfile)]
        else:
            cmdfile = work / "xargs.cmds"
            cmdfile.write_text("".join(f"{py} {c}\n" for c in cmds))
            argv = ["xargs", "-a", str(cmdfile), "-d", "\n", "-n", "1", "-P",
                    str(args.concurrency), "bash", "-c"]
        sampler = Sampler(cg)
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cg.wrap(argv), env=env, stdout=subprocess.DEVNULL,
                                    stderr=err)
            completed = sampler.run_until(proc, args.timeout)
        makespan = time.monotonic() - t0
        oom = cg.oom_kills()
        peak_used = cg.peak()
    finally:
        cg.remove()
    attempts = [f.read_text().split() for f in log.iterdir()]
    done = {f.name.split(".")[0] for f in log.iterdir() if f.read_text().startswith("done")}
    # An attempt killed before its first record leaves an empty file: it was killed too.
    killed = [a for a in attempts if not a or a[0] != "done"]
    mem_s = sum(float(a[4]) for a in attempts if a and a[0] == "done")
    res: dict[str, Any] = {
        "makespan_s": makespan,
        "completed_in_time": completed,
        "tasks_done": len(done),
        "tasks_lost": len(peaks) - len(done),
        "attempts": len(attempts),
        "attempts_killed": len(killed),
        "kernel_oom_kills": oom,
        "evictions": max(0, len(killed) - oom),
        "wasted_cpu_s": sum(float(a[2]) for a in killed if a),
        "wasted_task_s": sum(float(a[1]) for a in killed if a),
        "mem_mean_util": (sum(sampler.samples) / len(sampler.samples) / limit
                          if sampler.samples else 0.0),
        "mem_peak_util": peak_used / limit,
        "done_mb_s": mem_s,
        "exit_code": proc.returncode,
        "warm_up_s": warm_s,
    }
    if tool.startswith("distcomp"):
        status = json.loads(subprocess.run(
            [*DISTCOMP, "--redis", server.url, "--namespace", ns, "status", "--json"],
            env=env, check=True, capture_output=True, text=True).stdout)
        res["queue"] = {k: status[k] for k in ("finished", "failed", "todo", "running")}
        res["tasks_lost"] = max(res["tasks_lost"], len(peaks) - status["finished"])
    res["stderr_tail"] = stderr_path.read_text()[-1500:]
    return res


def schedule(tools: list[str], rounds: int) -> list[list[str]]:
    """The tools each round runs, in order. The distcomp rows are close (static packing with
    every true peak declared is what undeclared distcomp has to beat), so they run ``rounds``
    times, in the reverse order every other round, so that each pair of them swaps which goes
    first and a slow spell of the machine hits them alike (rotating the order of three kept one
    pair in the same order in both of two rounds); the peers, twice as slow and more, run once,
    in the first round."""
    mine = [t for t in tools if t.startswith("distcomp")]
    out = [list(mine) if r % 2 == 0 else mine[::-1] for r in range(rounds)] if mine else [[]]
    out[0] += [t for t in tools if not t.startswith("distcomp")]
    return out


def summarise(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool's row: its median run by makespan (of two, the slower), with every run's figures
    beside it; tasks lost and kernel OOM kills are the worst of any run, since one is already
    too many."""
    by_time = sorted(rs, key=lambda r: r["makespan_s"])
    out = dict(by_time[len(by_time) // 2])
    out["tasks_lost"] = max(r["tasks_lost"] for r in rs)
    out["kernel_oom_kills"] = max(r["kernel_oom_kills"] for r in rs)
    out["runs"] = [{k: r[k] for k in ("makespan_s", "evictions", "wasted_task_s",
                                      "kernel_oom_kills", "tasks_lost")} for r in rs]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--min-mb", type=int, default=100)
    ap.add_argument("--max-mb", type=int, default=700)
    ap.add_argument("--grow", type=float, default=3.0, help="seconds to reach the peak")
    ap.add_argument("--hold", type=float, default=1.0, help="seconds at the peak")
    ap.add_argument("--capacity-mb", type=int, default=3072, help="cgroup limit of every tool")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="job slots of every tool (parallel -j, xargs -P, worker --max-tasks)")
    ap.add_argument("--memfree-mb", type=int, default=700, help="GNU parallel --memfree")
    ap.add_argument("--retries", type=int, default=20, help="GNU parallel --retries")
    ap.add_argument("--python-mb", type=int, default=16,
                    help="interpreter's own memory added to the true peak for distcomp-static")
    ap.add_argument("--worker-args", default="",
                    help="extra options for every distcomp worker, e.g. '--memory-reserve 768M'")
    ap.add_argument("--overcommit", default=OVERCOMMIT_AUTO,
                    help="worker --overcommit of the distcomp-overcommit row: auto or a factor")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each distcomp row (median reported); peers run once")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per tool")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    try:
        args.overcommit = parse_overcommit(args.overcommit, "--overcommit")
        check_overcommit(args.overcommit)
    except ConfigError as exc:
        ap.error(str(exc))
    if args.smoke:
        args.tasks, args.min_mb, args.max_mb, args.capacity_mb = 8, 50, 250, 1024
        args.grow, args.hold, args.concurrency, args.memfree_mb = 2.0, 0.5, 4, 250
        args.timeout, args.rounds = 120, 2
    ensure_tools(["redis-server", "parallel"])
    peaks = make_tasks(args.tasks, args.seed, args.min_mb, args.max_mb)
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in args.tools.split(",")}
    with tempfile.TemporaryDirectory(prefix="distcomp-bench-packing-") as tmp, \
            RedisServer() as server:
        for rnd, tools in enumerate(schedule(list(runs), args.rounds)):
            work = Path(tmp) / f"round{rnd}"
            work.mkdir()
            for tool in tools:
                print(f"packing: {tool} (round {rnd + 1}/{args.rounds}) ...", flush=True)
                r = run_tool(tool, peaks, args, server, work, rnd)
                runs[tool].append(r)
                print(f"  {r['makespan_s']:.1f} s, {r['tasks_done']}/{args.tasks} done, "
                      f"{r['attempts_killed']} killed ({r['kernel_oom_kills']} by the kernel); "
                      f"memory warm-up before it {r['warm_up_s']:.1f} s", flush=True)
    results = {tool: summarise(rs) for tool, rs in runs.items()}
    capacity_mb = args.capacity_mb
    # The workload's own memory-seconds (each task's buffers ramp up over GROW, then stay for
    # HOLD), packed fluidly into the capacity; the measured variant uses the memory-seconds the
    # finished attempts really held (tasks run slower on a loaded machine), smallest over the
    # tools that finished every task.
    lower = sum(p * (args.grow / 2 + args.hold) for p in peaks) / capacity_mb
    ramp = ramp_bound(peaks, worker_room(capacity_mb), args.grow, args.hold)
    static_best = ideal_static(peaks, capacity_mb, args.concurrency, args.grow + args.hold)
    foresight = ideal_foresight(peaks, capacity_mb, args.concurrency, args.grow, args.hold)
    complete = [r["done_mb_s"] for r in results.values() if r["tasks_lost"] == 0]
    measured = min(complete) / capacity_mb if complete else 0.0
    for r in results.values():
        r["vs_lower_bound"] = r["makespan_s"] / lower if lower else 0.0
    dc = results.get("distcomp", {})
    # Paired by round: each round's distcomp rows ran back to back.
    static_runs = runs.get("distcomp-static", [])
    vs_static = {t: [u["makespan_s"] / st["makespan_s"] for u, st in zip(runs[t], static_runs)]
                 for t in UNDECLARED if t in runs and static_runs}
    # A peer that lost tasks or ran out of time did not do the work: its time is no bar (xargs
    # gives up after its first killed task, in 4 s, and made the flag false in every run).
    peers = [r["makespan_s"] if r["tasks_lost"] == 0 and r["completed_in_time"] else math.inf
             for t, r in results.items() if t not in UNDECLARED]
    targets = {}
    for t in UNDECLARED:
        if t in results:
            r, key = results[t], t.replace("-", "_")
            targets[f"{key}_within_1.25x_lower_bound"] = r["vs_lower_bound"] <= 1.25
            targets[f"{key}_beats_every_peer"] = all(r["makespan_s"] < m for m in peers)
            targets[f"{key}_lost_0"] = r["tasks_lost"] == 0
            targets[f"{key}_kernel_oom_0"] = r["kernel_oom_kills"] == 0
    doc = {
        "params": {k: getattr(args, k) for k in ("tasks", "seed", "min_mb", "max_mb", "grow",
                                                  "hold", "capacity_mb", "concurrency",
                                                  "memfree_mb", "retries", "worker_args",
                                                  "overcommit", "rounds", "smoke")},
        "peaks_mb": peaks,
        "lower_bound_s": lower,
        "lower_bound_measured_s": measured,
        "ramp_bound_s": ramp,
        "ideal_static_s": static_best,
        "ideal_foresight_s": foresight,
        "tools": results,
        "vs_static": {t: {"rounds": v, "median": statistics.median(v)}
                      for t, v in vs_static.items()},
        "distcomp": {"tasks_lost": dc.get("tasks_lost"),
                     "kernel_oom_kills": dc.get("kernel_oom_kills")},
        "targets": targets,
    }
    print()
    print(table(f"packing: {args.tasks} tasks of {args.min_mb}-{args.max_mb} MB (seed "
                f"{args.seed}), grow {args.grow:g}s + hold {args.hold:g}s, capacity "
                f"{capacity_mb} MiB, {args.concurrency} slots; lower bound {lower:.1f} s "
                f"(from measured task memory-seconds: {measured:.1f} s); no schedule within the "
                f"worker's room below {ramp:.1f} s ({ramp / lower:.2f}x, bench/packing_optimum.py "
                f"has the best one); ideal static packing "
                f"{static_best:.1f} s ({static_best / lower:.2f}x); exact foresight of every "
                f"task's growth {foresight:.1f} s ({foresight / lower:.2f}x)",
                ["tool", "makespan s", "x lower bound", "mem mean", "mem peak", "evictions",
                 "kernel OOM", "wasted CPU s", "wasted task s", "lost", "every run s"],
                [[t, r["makespan_s"], r["vs_lower_bound"], f"{100 * r['mem_mean_util']:.0f}%",
                  f"{100 * r['mem_peak_util']:.0f}%", r["evictions"], r["kernel_oom_kills"],
                  r["wasted_cpu_s"], r["wasted_task_s"], r["tasks_lost"],
                  " ".join(f"{x['makespan_s']:.1f}" for x in r["runs"])]
                 for t, r in results.items()]))
    for t, v in vs_static.items():
        print(f"\n{t} / distcomp-static, round by round: {' '.join(f'{x:.3f}' for x in v)} "
              f"(median {statistics.median(v):.3f}; below 1 is {t} faster)")
    path = write_result("packing", doc, args.out)
    print(f"\nresult: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
