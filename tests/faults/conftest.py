"""Fixtures of the fault-injection suite: real redis-server processes, real worker processes.

Everything here starts its own processes on loopback ports it picked itself and ends exactly
those processes (by pid, or by the run tag every worker and task carries in its environment).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from faultharness import free_port, wait_for

RESULTS_DIR = Path(__file__).parent / ".results"
RUN_TAG_VAR = "DISTCOMP_FAULTS_RUN"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", type=float, default=0.0, metavar="SECONDS",
                     help="run the combined fault soak for this many seconds of injection "
                          "(default: a short round that fits the CI budget)")
    parser.addoption("--fault-seed", type=int, default=None,
                     help="seed of the fault schedules (default: fixed per test)")


# -- redis-server ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server_bin() -> str:
    """redis-server, installed with apt on a fresh CI machine."""
    found = shutil.which("redis-server")
    if found is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "redis-server"], check=True, env=env,
                       capture_output=True)
        found = shutil.which("redis-server") or "/usr/bin/redis-server"
    return found


class RedisServer:
    """One redis-server with appendonly on, in its own directory, on a loopback port."""

    def __init__(self, binary: str, directory: Path, password: str | None = None) -> None:
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--appendonly", "yes", "--save", "",
                "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(f"redis-server on port {self.port}", self._ready, 30)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"redis-server exited with {self.proc.returncode}: {log}")
        try:
            return bool(self.client(socket_timeout=1).ping())
        except redis.BusyLoadingError:
            return False
        except redis.ConnectionError:
            return False

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_factory(redis_server_bin: str, tmp_path: Path):
    servers: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        server = RedisServer(redis_server_bin, tmp_path / f"redis{len(servers)}", password)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_factory) -> RedisServer:
    return redis_factory()


# -- a TCP proxy that can be cut ---------------------------------------------------------------
class CuttableProxy:
    """Forwards a loopback port to Redis. ``cut()`` resets every connection and refuses new
    ones until ``restore()``: a link that fails loudly. ``cut(silent=True)`` stops moving bytes
    and holds new connections, as a partition where packets are dropped; on ``restore()`` the
    held bytes flow again, as TCP retransmission delivers them once the network heals.
    ``lose_replies()`` lets requests through but drops what Redis answers, then resets: the
    commands ran, and the worker cannot know it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_now = False
        self.flowing = threading.Event()
        self.flowing.set()
        self.dropping = False
        self.closed = False
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_now:
                _reset(client)
                continue
            self.flowing.wait()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self.lock:
                self.conns += [client, upstream]
            for a, b, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, replies), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                if replies and self.dropping:
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, silent: bool = False) -> None:
        if silent:
            self.flowing.clear()
            return
        self.cut_now = True
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            _reset(s)

    def lose_replies(self, seconds: float) -> None:
        self.dropping = True
        time.sleep(seconds)
        self.cut()
        self.dropping = False

    def restore(self) -> None:
        self.cut_now = False
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        self.cut()
        self.listener.close()


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    except OSError:
        pass


@pytest.fixture
def proxy_factory():
    proxies: list[CuttableProxy] = []

    def make(upstream_port: int) -> CuttableProxy:
        proxy = CuttableProxy(upstream_port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


# -- workers -----------------------------------------------------------------------------------
class WorkerProc:
    def __init__(self, cluster: Cluster, name: str, url: str, extra: list[str]) -> None:
        self.cluster = cluster
        self.name = name
        self.url = url
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log_path = cluster.dir / "logs" / f"{name}.{uuid.uuid4().hex[:6]}.log"

    def start(self) -> WorkerProc:
        c = self.cluster
        argv = [sys.executable, "-m", "distcomp", "--redis", self.url, "--namespace", c.ns,
                "worker", "--name", self.name, "--results-dir", str(c.results),
                "--workdir", str(c.dir), "--heartbeat-ttl", str(c.ttl),
                "--log-level", "info", *c.worker_args, *self.extra]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=c.env, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """One distcomp namespace on one redis-server with the workers, taskfiles and logs of a test.

    Every process started here carries ``DISTCOMP_FAULTS_RUN=<tag>`` in its environment (tasks
    inherit it from their worker), so teardown can end exactly this test's processes.
    """

    def __init__(self, server: RedisServer, directory: Path, ttl: float = 3.0,
                 worker_args: list[str] | None = None) -> None:
        self.server = server
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results = directory / "results"
        self.task_log = directory / "executions.log"
        self.ns = "distcomp"
        self.ttl = ttl
        self.worker_args = worker_args or []
        self.tag = uuid.uuid4().hex
        self.env = dict(os.environ, **{RUN_TAG_VAR: self.tag})
        self.env.pop("DISTCOMP_REDIS_URL", None)
        self.env.pop("DISTCOMP_CONFIG", None)
        self.workers: list[WorkerProc] = []
        self.r = server.client(socket_timeout=10)
        self.submitted: dict[str, str] = {}

    # -- CLI --
    def cli(self, *args: str, url: str | None = None, stdin: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        # In the environment: the CLI refuses a password in --redis (ps shows it to everyone).
        argv = [sys.executable, "-m", "distcomp", "--namespace", self.ns, *args]
        return subprocess.run(argv, input=stdin, capture_output=True,
                              env={**self.env, "DISTCOMP_REDIS_URL": url or self.server.url},
                              timeout=timeout, check=False)

    def submit_lines(self, lines: list[str]) -> dict[str, int]:
        path = self.dir / f"tasks-{len(self.submitted)}.txt"
        path.write_text("".join(line + "\n" for line in lines))
        out = self.cli("submit", str(path), "--json")
        assert out.returncode == 0, out.stderr.decode()
        doc = json.loads(out.stdout)
        from distcomp.spec import parse_taskfile
        for spec in parse_taskfile(path.read_bytes()).tasks:
            self.submitted[spec.task_id] = spec.params
        return doc

    # -- workers --
    def worker(self, name: str, url: str | None = None, extra: list[str] | None = None,
               ) -> WorkerProc:
        w = WorkerProc(self, name, url or self.server.url, extra or []).start()
        self.workers.append(w)
        return w

    def counts(self) -> dict[str, int]:
        raw = self.r.hgetall(f"{self.ns}:counts")
        return {k.decode(): int(v) for k, v in raw.items()}

    def done(self) -> int:
        c = self.counts()
        return c.get("finished", 0) + c.get("failed", 0)

    def settled(self) -> bool:
        c = self.counts()
        return (c.get("todo", 0) == 0 and c.get("running", 0) == 0
                and c.get("finished", 0) + c.get("failed", 0) >= len(self.submitted))

    def wait_settled(self, timeout: float) -> None:
        def check() -> bool:
            try:
                return self.settled()
            except redis.ConnectionError:
                return False
        try:
            wait_for("every task finished or failed", check, timeout, every=0.1)
        except AssertionError:
            raise AssertionError(f"not settled after {timeout:g}s: counts {self.counts()}; "
                                 f"workers alive: {[w.name for w in self.workers if w.alive()]}"
                                 ) from None

    def stop_workers(self) -> None:
        for w in self.workers:
            if w.alive():
                w.signal(signal.SIGCONT)
                w.signal(signal.SIGTERM)
        for w in self.workers:
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    w.kill9()

    def tagged_pids(self) -> list[int]:
        """Processes (workers and tasks) started by this test, still alive."""
        pids = []
        needle = f"{RUN_TAG_VAR}={self.tag}".encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as fh:
                    if needle not in fh.read().split(b"\0"):
                        continue
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            if stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] != b"Z":
                pids.append(int(entry.name))
        return pids

    def teardown(self) -> None:
        for w in self.workers:
            if w.alive():
                try:
                    w.signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
        self.stop_workers()
        for pid in self.tagged_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def cluster_factory(tmp_path: Path):
    clusters: list[Cluster] = []

    def make(server: RedisServer, **kwargs: Any) -> Cluster:
        c = Cluster(server, tmp_path / f"cluster{len(clusters)}", **kwargs)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.teardown()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    given = request.config.getoption("--fault-seed", default=None)
    if given is not None:
        return int(given)
    return sum(map(ord, request.node.name))


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


@pytest.fixture
def soak_seconds(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--soak", default=0.0) or 0.0)


@pytest.fixture
def record(request: pytest.FixtureRequest, seed: int):
    """Measurements of one scenario, written to tests/faults/.results/<test>.json."""
    doc: dict[str, Any] = {"test": request.node.name, "seed": seed,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    yield doc
    RESULTS_DIR.mkdir(exist_ok=True)
    doc["outcome"] = "failed" if getattr(request.node, "rep_failed", False) else "passed"
    (RESULTS_DIR / f"{request.node.name}.json").write_text(json.dumps(doc, indent=2,
                                                                      sort_keys=True) + "\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    if rep.when == "call" and rep.failed:
        item.rep_failed = True  # type: ignore[attr-defined]
    return rep
