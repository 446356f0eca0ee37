"""A task whose memory grows: touches TARGET_MB in 10 MB steps, then holds it for HOLD_S.

Further arguments only tell tasks apart, except ``after=FILE``: wait until FILE exists before
growing (exit 2 if it has not appeared within 60 s, so that a test fails rather than hangs)."""

import os
import sys
import time

target_mb, step_s, hold_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
cue = next((a[len("after="):] for a in sys.argv[4:] if a.startswith("after=")), None)
if cue is not None:
    deadline = time.monotonic() + 60
    while not os.path.exists(cue):
        if time.monotonic() > deadline:
            print(f"{cue} did not appear within 60 s", file=sys.stderr)
            sys.exit(2)
        time.sleep(0.01)
chunks = []
for _ in range(target_mb // 10):
    chunk = bytearray(10 << 20)
    chunk[::4096] = b"x" * len(chunk[::4096])
    chunks.append(chunk)
    time.sleep(step_s)
time.sleep(hold_s)
print(f"held {target_mb} MB")
