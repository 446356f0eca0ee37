"""A benchmark task: grow to PEAK MB over GROW seconds, hold it HOLD seconds, exit 0.

Every 0.1 s it rewrites ``LOGDIR/NAME.PID`` with its elapsed wall time, CPU time, the MB it
holds and the MB-seconds it has held so far, and prefixes ``done`` once it has finished. An attempt that was killed
(evicted, or by the kernel's OOM killer) leaves a file without ``done``: its numbers are the
work that was wasted. The tool running the task does not matter, so every tool is measured
the same way.
"""

from __future__ import annotations

import argparse
import os
import time

PAGE = 4096
STEP_S = 0.1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak", type=int, required=True, help="MB to hold at the end")
    ap.add_argument("--grow", type=float, required=True)
    ap.add_argument("--hold", type=float, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    path = os.path.join(args.log, f"{args.name}.{os.getpid()}")
    t0 = time.monotonic()
    held: list[bytearray] = []
    have = 0
    mem_s = 0.0
    last, last_have = t0, 0

    def record(prefix: str = "run") -> None:
        nonlocal mem_s, last, last_have
        now = time.monotonic()
        mem_s += (last_have >> 20) * (now - last)
        last, last_have = now, have
        cpu = sum(os.times()[:2])
        with open(path, "w") as fh:
            fh.write(f"{prefix} {now - t0:.3f} {cpu:.3f} {have >> 20} {mem_s:.1f}\n")

    steps = max(1, round(args.grow / STEP_S))
    target = args.peak << 20
    for i in range(1, steps + 1):
        want = target * i // steps
        if want > have:
            chunk = bytearray(want - have)
            chunk[::PAGE] = b"\1" * len(range(0, len(chunk), PAGE))
            held.append(chunk)
            have = want
        record()
        time.sleep(max(0.0, t0 + i * args.grow / steps - time.monotonic()))
    end = time.monotonic() + args.hold
    while time.monotonic() < end:
        time.sleep(min(STEP_S, max(0.0, end - time.monotonic())))
        record()
    record("done")


if __name__ == "__main__":
    main()
