"""Fixtures shared by the runtime tests: a real redis-server and real worker processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from distcomp.queue import Queue
from distcomp.redis_client import Redis
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.dir = workdir
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=self.password)
        wait_for(lambda: _pings(client), 20, "redis-server to answer")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path):
    """``own_redis(password=None)``: a started redis-server of the test's own, to stop, start
    again or freeze (SIGSTOP) without touching other tests; stopped at the end."""
    made: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        workdir = tmp_path / f"redis-{len(made)}"
        workdir.mkdir()
        server = RedisServer(workdir, password)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    """redis-py, to look at what distcomp wrote through a client that is not distcomp's."""
    return redis.Redis(port=redis_server.port)


@pytest.fixture
def queue(redis_server: RedisServer, namespace: str) -> Queue:
    return Queue(Redis(redis_server.url), namespace)


@pytest.fixture
def cli(redis_server: RedisServer, namespace: str, tmp_path: Path):
    """Run the real ``distcomp`` command against the test's Redis and namespace."""

    def run(*args: str, input: bytes | None = None, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "DISTCOMP_REDIS_URL": redis_server.url,
                    "DISTCOMP_NAMESPACE": namespace, "DISTCOMP_CONFIG": str(tmp_path / "none.conf")}
        full_env.pop("DISTCOMP_REDIS_PASSWORD", None)
        (tmp_path / "none.conf").touch()
        for name, value in (env or {}).items():  # None: not set at all
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        proc = subprocess.run([sys.executable, "-m", "distcomp", *args], input=input,
                              capture_output=True, env=full_env, cwd=tmp_path, timeout=120,
                              check=False)
        if check:
            assert proc.returncode == 0, proc.stderr.decode()
        return proc

    return run


class WorkerProcess:
    """A real ``distcomp worker`` process in its own session."""

    def __init__(self, redis_server: RedisServer, namespace: str, name: str, results: Path,
                 args: list[str], pass_fds: tuple[int, ...] = (),
                 cgroup: Path | None = None) -> None:
        self.name = name
        self.log = results.parent / f"worker-{name}-{uuid.uuid4().hex[:6]}.log"
        env = {**os.environ, "DISTCOMP_REDIS_URL": redis_server.url,
               "DISTCOMP_NAMESPACE": namespace, "DISTCOMP_CONFIG": str(results.parent / "none.conf")}
        (results.parent / "none.conf").touch()
        with open(self.log, "wb") as log:
            # Into the cgroup by the same process, before it becomes the worker.
            enter = [] if cgroup is None else [
                "sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup)]
            self.proc = subprocess.Popen(
                [*enter, sys.executable, "-m", "distcomp", "worker", "--name", name,
                 "--results-dir", str(results), "--kill-grace", "1", *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                pass_fds=pass_fds)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_everything(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workers(redis_server: RedisServer, namespace: str, tmp_path: Path, queue: Queue,
            client: redis.Redis):
    """Start workers with ``workers(name, *args)``; waits until each holds its lease."""
    started: list[WorkerProcess] = []
    results = tmp_path / "results"

    def start(name: str, *args: str, wait_registered: bool = True,
              pass_fds: tuple[int, ...] = (), cgroup: Path | None = None) -> WorkerProcess:
        """``cgroup``: a cgroup directory the worker starts in."""
        w = WorkerProcess(redis_server, namespace, name, results, list(args), pass_fds, cgroup)
        started.append(w)
        if wait_registered:
            wait_for(lambda: client.hget(queue.key("w", name), "pid") == str(w.proc.pid).encode()
                     or w.proc.poll() is not None, 30, f"worker {name} to register")
            assert w.proc.poll() is None, w.output()
        return w

    start.results = results
    yield start
    for w in started:
        w.kill_everything()
    # Tasks live in their own sessions: make sure none outlives the test.
    for pid_bytes in _task_pids(client, queue):
        try:
            os.killpg(int(pid_bytes), signal.SIGKILL)
        except OSError:
            pass


def _task_pids(client: redis.Redis, queue: Queue) -> list[bytes]:
    pids = []
    for key in client.scan_iter(match=queue.key("t", "*")):
        pid = client.hget(key, "pid")
        if pid:
            pids.append(pid)
    return pids
