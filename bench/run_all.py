"""Run every benchmark in turn (``--smoke`` for CI sizes) and print where the results went.

Each benchmark starts and stops its own loopback redis-server and writes
bench/results/<name>-<time>.json plus <name>-latest.json; a benchmark that fails does not stop
the others, but makes the exit status 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = ("dispatch", "packing", "scale")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    ap.add_argument("--only", default=",".join(ORDER), help="comma-separated subset")
    args = ap.parse_args(argv)
    failed = []
    t_all = time.monotonic()
    for name in args.only.split(","):
        t0 = time.monotonic()
        print(f"=== {name} ===", flush=True)
        rc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"),
                             *(["--smoke"] if args.smoke else [])], check=False).returncode
        print(f"=== {name}: exit {rc} after {time.monotonic() - t0:.0f} s ===\n", flush=True)
        if rc:
            failed.append(name)
    print(f"all benchmarks: {time.monotonic() - t_all:.0f} s; results in {BENCH / 'results'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
