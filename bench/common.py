"""Shared pieces of the benchmarks: tools, a private Redis, memory cgroups, tables and results.

Every benchmark starts its own ``redis-server`` on a free loopback port with persistence off and
stops it at the end, so it never touches a Redis it did not start and sends nothing beyond
127.0.0.1. distcomp runs as the real CLI and worker processes (``python -m distcomp``) with this
checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import compileall
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))
from distcomp.queue import Queue  # this checkout, not an installed copy
from distcomp.redis_client import Redis as DistcompRedis

RESULTS_DIR = BENCH_DIR / "results"
DISTCOMP = [sys.executable, "-m", "distcomp"]
APT_PACKAGES = {"redis-server": "redis-server", "parallel": "parallel"}
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


def ensure_tools(tools: Sequence[str]) -> None:
    """Install the Debian packages of missing tools (CI machines start fresh)."""
    missing = [APT_PACKAGES[t] for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"missing {', '.join(missing)}: install them (apt-get install -y "
                         f"{' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    # The package starts a system redis-server; the benchmarks never use it, so stop it again.
    if "redis-server" in missing and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", "redis-server"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def child_env(**extra: str) -> dict[str, str]:
    """Environment for distcomp processes: this checkout importable, no config file leaking in.

    The checkout is byte-compiled first, as pip compiles the runtime when it installs the wheel
    on the nodes: with PYTHONDONTWRITEBYTECODE set (this VM sets it for every process) Python
    would otherwise compile distcomp's modules again at every start, 30 ms per command here."""
    compileall.compile_dir(REPO / "distcomp", quiet=1)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env["DISTCOMP_CONFIG"] = os.devnull
    for key in ("DISTCOMP_REDIS_URL", "DISTCOMP_REDIS_PASSWORD", "DISTCOMP_NAMESPACE"):
        env.pop(key, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private, unpersisted redis-server on 127.0.0.1; ready once it says so on stdout."""

    def __init__(self, maxmemory: str | None = None) -> None:
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None
        self._drain: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="distcomp-bench-redis-")
        self.port = 0

    def __enter__(self) -> RedisServer:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        ensure_tools(["redis-server"])
        for _ in range(5):
            self.port = _free_port()
            if self._start():
                return self
        raise RuntimeError("could not start redis-server on a free loopback port")

    def _start(self) -> bool:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--protected-mode", "yes", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--daemonize", "no", "--loglevel", "notice",
                "--logfile", ""]
        if self.maxmemory:
            argv += ["--maxmemory", self.maxmemory]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if b"Ready to accept connections" in buf:
                # Keep draining its log so the server never blocks on a full pipe.
                self._drain = subprocess.Popen(["cat"], stdin=self.proc.stdout,
                                               stdout=subprocess.DEVNULL)
                return True
        self.proc.kill()
        self.proc.wait()
        return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """redis-py, for INFO: what the benchmark reads about Redis, not through distcomp."""
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def queue(self, namespace: str) -> Queue:
        """distcomp's own queue API on this server, as the CLI and workers use it."""
        return Queue(DistcompRedis(self.url), namespace)

    def cpu_seconds(self) -> float:
        info = self.client().info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._drain is not None:
            self._drain.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class MemoryCgroup:
    """A child cgroup (v1 memory controller) with a hard limit, for one tool under test.

    Processes enter it through ``wrap``: a shell writes its own pid into ``cgroup.procs`` and
    then execs the real command, so everything the tool starts is charged to the group from
    its first byte. Kernel OOM kills are read from ``memory.oom_control``.
    """

    def __init__(self, name: str, limit_bytes: int) -> None:
        own = _own_v1_memory_cgroup()
        self.path = CGROUP_V1_MEMORY / own.lstrip("/") / f"distcomp-bench-{name}-{os.getpid()}"
        self.path.mkdir()
        self.limit = limit_bytes
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap_limit = self.path / "memory.memsw.limit_in_bytes"
        if swap_limit.exists():
            swap_limit.write_text(str(limit_bytes))

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def _stat(self) -> dict[str, int]:
        out = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            out[key] = int(value)
        return out

    def used(self) -> int:
        """Charged memory minus inactive page cache (what the kernel cannot just drop)."""
        usage = int((self.path / "memory.usage_in_bytes").read_text())
        return max(0, usage - self._stat().get("total_inactive_file", 0))

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def procs(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        for pid in self.procs():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


def _own_v1_memory_cgroup() -> str:
    if not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists():
        raise SystemExit("the packing benchmark needs the cgroup v1 memory controller at "
                         f"{CGROUP_V1_MEMORY} (this machine has none)")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return "/"


def machine() -> dict[str, Any]:
    import psutil

    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_avg": os.getloadavg(),
        "redis_server": _version(["redis-server", "--version"]),
        "parallel": _version(["parallel", "--version"]),
    }


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else ""


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def write_result(name: str, doc: dict[str, Any], out: str | None = None) -> Path:
    """bench/results/<name>-<UTC time>.json, plus a copy as <name>-latest.json; with ``out``
    only that file, so the CI smoke run and one-off runs leave the recorded results alone."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(), **doc}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    path = Path(out) if out else RESULTS_DIR / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if not out:
        (RESULTS_DIR / f"{name}-latest.json").write_text(text)
    return path


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def run_timed(argv: Sequence[str], **kwargs: Any) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(list(argv), check=False, **kwargs)
    return time.perf_counter() - t0, proc
