"""A long task that keeps growing slowly: touches START_MB at once, then RATE_MB_S more every
second (in 0.1 s steps) until the file UNTIL exists, and exits 0. Exits 2 after CAP_S seconds
without it, so a test that waits for the file fails rather than hangs."""

import os
import sys
import time

start_mb, rate_mb_s, until, cap_s = (int(sys.argv[1]), float(sys.argv[2]), sys.argv[3],
                                     float(sys.argv[4]))
STEP_S = 0.1
chunks = []


def touch(mb: float) -> None:
    chunk = bytearray(int(mb * (1 << 20)))
    chunk[::4096] = b"x" * len(chunk[::4096])
    chunks.append(chunk)


touch(start_mb)
deadline = time.monotonic() + cap_s
while not os.path.exists(until):
    if time.monotonic() > deadline:
        print(f"{until} did not appear within {cap_s:g} s", file=sys.stderr)
        sys.exit(2)
    touch(rate_mb_s * STEP_S)
    time.sleep(STEP_S)
print(f"held {sum(map(len, chunks)) >> 20} MB")
