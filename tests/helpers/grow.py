"""A task whose memory grows: touches TARGET_MB in 10 MB steps, then holds it for HOLD_S."""

import sys
import time

target_mb, step_s, hold_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
chunks = []
for _ in range(target_mb // 10):
    chunk = bytearray(10 << 20)
    chunk[::4096] = b"x" * len(chunk[::4096])
    chunks.append(chunk)
    time.sleep(step_s)
time.sleep(hold_s)
print(f"held {target_mb} MB")
