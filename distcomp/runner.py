"""Running one task: its own session, output straight to files, peak memory, killing its tree.

Output goes to files rather than pipes so a task that writes gigabytes (or invalid UTF-8) costs
the worker nothing; only a bounded tail is read back for Redis. The part files carry the attempt
number and are renamed to their final names only after the queue accepted the report, so the
files on disk always belong to the attempt that was recorded.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .queue import Claim
from .resources import session_pids


@dataclass
class RunningTask:
    claim: Claim
    proc: subprocess.Popen | None
    pid: int
    pidfd: int
    started: float
    started_mono: float
    out_part: Path
    err_part: Path
    peak_rss: int = 0
    rss: int = 0
    kill_reason: str | None = None
    kill_deadline: float | None = None
    returncode: int | None = None
    ended: float = 0.0
    spawn_error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return self.claim.task_id


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Runner:
    """Starts, watches and cleans up the processes of tasks on this node."""

    def __init__(self, results_dir: str, workdir: str, python: str, tail_bytes: int,
                 extra_env: dict[str, str]) -> None:
        self.results = Path(results_dir)
        self.workdir = workdir
        self.python = python
        self.tail_bytes = tail_bytes
        self.base_env = {**os.environ, **extra_env}
        self._made: set[Path] = set()

    def shard(self, task_id: str) -> Path:
        """Results fan out over 256 directories: a million files in one folder hurts MooseFS."""
        d = self.results / task_id[:2]
        if d not in self._made:
            d.mkdir(parents=True, exist_ok=True)
            self._made.add(d)
        return d

    def final_paths(self, task_id: str) -> tuple[Path, Path]:
        d = self.results / task_id[:2]
        return d / f"{task_id}.out", d / f"{task_id}.err"

    def argv(self, claim: Claim) -> list[str]:
        if claim.type == "python":
            return [self.python, *shlex.split(claim.params)]
        return ["bash", "-c", claim.params]

    def start(self, claim: Claim) -> RunningTask:
        d = self.shard(claim.task_id)
        out_part = d / f"{claim.task_id}.a{claim.attempt}.out"
        err_part = d / f"{claim.task_id}.a{claim.attempt}.err"
        env = {**self.base_env, **claim.env}
        env["DISTCOMP_TASK_ID"] = claim.task_id
        env["DISTCOMP_ATTEMPT"] = str(claim.attempt)
        now, mono = time.time(), time.monotonic()
        try:
            with open(out_part, "wb") as out, open(err_part, "wb") as err:
                proc = subprocess.Popen(
                    self.argv(claim), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    cwd=claim.cwd or self.workdir or None, env=env, start_new_session=True,
                    close_fds=True,
                )
        except (OSError, ValueError) as exc:
            reason = f"cannot start: {getattr(exc, 'strerror', None) or exc}"
            if isinstance(exc, FileNotFoundError) and exc.filename:
                reason += f": {exc.filename}"
            return RunningTask(claim, None, 0, -1, now, mono, out_part, err_part,
                               returncode=127, ended=now, spawn_error=reason)
        return RunningTask(claim, proc, proc.pid, os.pidfd_open(proc.pid), now, mono,
                           out_part, err_part)

    def signal_tree(self, task: RunningTask, sig: int, sweep: bool = False) -> None:
        """Signal the task's process group; with ``sweep`` also any process of its session
        that moved to another group."""
        if task.pid <= 0:
            return
        try:
            os.killpg(task.pid, sig)
        except OSError as exc:
            if exc.errno not in (errno.ESRCH, errno.EPERM):
                raise
        if sweep:
            kill_session(task.pid, sig)

    def kill(self, task: RunningTask, reason: str, grace: float) -> None:
        """TERM now, KILL once the grace period is over (see ``escalate``)."""
        if task.kill_reason is None:
            task.kill_reason = reason
        if task.kill_deadline is None:
            self.signal_tree(task, signal.SIGTERM)
            task.kill_deadline = time.monotonic() + grace

    def escalate(self, task: RunningTask) -> None:
        self.signal_tree(task, signal.SIGKILL, sweep=True)

    def try_reap(self, task: RunningTask) -> bool:
        """Collect the main process if it exited; kill what it left behind in its group."""
        if task.returncode is not None:
            return True
        try:
            exited = os.waitid(os.P_PID, task.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            exited = None
            status, usage = 0, None
        else:
            if exited is None:
                return False
            # The zombie still holds the pid, so the group id cannot have been reused yet.
            self.signal_tree(task, signal.SIGKILL)
            _, status, usage = os.wait4(task.pid, 0)
        task.returncode = os.waitstatus_to_exitcode(status)
        if task.proc is not None:
            task.proc.returncode = task.returncode
        if usage is not None:
            task.peak_rss = max(task.peak_rss, usage.ru_maxrss * 1024)
        task.ended = time.time()
        if task.pidfd >= 0:
            os.close(task.pidfd)
            task.pidfd = -1
        return True

    def tail(self, path: Path) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - self.tail_bytes))
                data = fh.read()
        except OSError:
            return ""
        return data.decode("utf-8", errors="replace")

    def keep(self, task: RunningTask) -> None:
        """The queue recorded this attempt: its output becomes the task's output."""
        out, err = self.final_paths(task.task_id)
        for part, final in ((task.out_part, out), (task.err_part, err)):
            try:
                os.replace(part, final)
            except FileNotFoundError:
                pass

    def discard(self, task: RunningTask) -> None:
        for part in (task.out_part, task.err_part):
            try:
                part.unlink()
            except FileNotFoundError:
                pass


def kill_session(sid: int, sig: int) -> int:
    """Signal every process of a session; returns how many were signalled."""
    n = 0
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
            n += 1
        except OSError:
            pass
    return n
