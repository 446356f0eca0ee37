"""A stand-in for a real simulation: burns a little CPU and memory, prints one result line."""

import argparse
import os
import random
import time

parser = argparse.ArgumentParser()
parser.add_argument("--size", default="0.1:0.5", help="LOW:HIGH seconds of work")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
low, high = (float(x) for x in args.size.split(":"))
rng = random.Random(args.seed)
seconds = rng.uniform(low, high)
buf = bytearray(rng.randint(5, 40) << 20)
deadline = time.monotonic() + seconds
acc = 0
while time.monotonic() < deadline:
    acc = (acc * 31 + rng.randint(0, 1 << 20)) % 1_000_003
if os.environ.get("SIM_VERBOSE"):
    print(f"allocated {len(buf) >> 20} MB")
print(f"seed={args.seed} size={args.size} result={acc}")
