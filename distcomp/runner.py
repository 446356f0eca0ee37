"""Running one task: its own session, output straight to files, peak memory, killing its tree.

Output goes to files rather than pipes so a task that writes gigabytes (or invalid UTF-8) costs
the worker nothing; only a bounded tail is read back for Redis. The part files carry the attempt
number and are renamed to their final names only after the queue accepted the report, so the
files on disk always belong to the attempt that was recorded.

Tasks start with ``posix_spawn``, not ``subprocess.Popen``: starting a process is most of what
the worker does for short tasks, and Popen spent as long in Python (converting the environment,
setting up pipes and handles) as the kernel spent starting the process. The worker opens the two
output files itself and keeps them open while the task runs, so the tails are read from those
descriptors without opening the files again.

A ``shell`` task made only of plain words (``./cachesim 4 lru``) is exec'd directly with the
environment bash would have given the program; bash's start-up was half the CPU of a short task.
Anything bash could interpret differently (quoting, expansion, operators, builtins, variables bash
acts on, a program the kernel will not exec) still goes through ``bash -c``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field

from .forecast import Trace
from .queue import Claim
from .resources import session_pids

log = logging.getLogger("distcomp.runner")

# O_APPEND: a task that opens /dev/stdout or /dev/stderr by name (`echo msg > /dev/stderr`)
# truncates the file, while its own descriptor 1 or 2 wrote on at its old offset and left a hole
# of NUL bytes before its next line. Appending, every write lands at the end.
_OUTPUT_FLAGS = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
# Less free space than this in the results directory is a full one (``Runner.full``).
_FULL_BELOW = 1 << 20
# Python ignores SIGPIPE and SIGXFSZ for itself; a task must start with the defaults, as
# subprocess's restore_signals gives them.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)

# A shell command made only of plain words (no quoting, expansion, globbing, redirection,
# comment or control operator) is one that bash would only split at blanks and exec, so the
# worker execs it itself, as GNU make does for such recipe lines: bash's start-up is half the
# cost of a short task. The first word may not look like an assignment or a job.
_PLAIN_COMMAND = re.compile(
    r"[ \t]*[A-Za-z0-9_./+@,:-]+(?:[ \t]+[A-Za-z0-9_./+@,:%=-]+)*[ \t]*")
# Words bash gives a meaning of its own: keywords and builtins (``compgen -k; compgen -b``).
# ``true`` and ``false`` are left out: /usr/bin/true and /usr/bin/false do the same, except
# when asked for --help or --version, which goes to bash (see ``direct_argv``).
_SHELL_WORDS = frozenset((
    "if", "then", "else", "elif", "fi", "case", "esac", "for", "select", "while", "until",
    "do", "done", "in", "function", "time", "coproc", ".", ":", "[", "alias", "bg", "bind",
    "break", "builtin", "caller", "cd", "command", "compgen", "complete", "compopt",
    "continue", "declare", "dirs", "disown", "echo", "enable", "eval", "exec", "exit",
    "export", "fc", "fg", "getopts", "hash", "help", "history", "jobs", "kill", "let",
    "local", "logout", "mapfile", "popd", "printf", "pushd", "pwd", "read", "readarray",
    "readonly", "return", "set", "shift", "shopt", "source", "suspend", "test", "times",
    "trap", "type", "typeset", "ulimit", "umask", "unalias", "unset", "wait",
))
# Variables bash does something with when it finds them in its environment: read a start-up
# file, turn on options such as xtrace, hide programs from the PATH search, call an exported
# function (BASH_FUNC_*), or pass on a value of its own instead (found by running
# ``env -i NAME=7 bash -c env`` for each of bash's variables). With any of them bash runs the
# task. What bash merely drops is dropped: PS1, PS2, and an OLDPWD that is no directory.
_BASH_VARIABLES = frozenset((
    "BASH_ENV", "SHELLOPTS", "BASHOPTS", "EXECIGNORE", "BASH_COMPAT", "BASH_XTRACEFD",
    "IFS", "PS4", "OPTIND", "OPTERR", "BASH", "BASH_ARGV0", "BASH_VERSION",
    "BASH_VERSINFO", "BASHPID", "BASH_SUBSHELL", "BASH_COMMAND", "BASH_EXECUTION_STRING",
    "PPID", "RANDOM", "SRANDOM", "LINENO", "HISTCMD", "EPOCHSECONDS", "EPOCHREALTIME",
    "COMP_WORDBREAKS",
))
_DROPPED = ("PS1", "PS2")
_LEVEL = re.compile(r"[ \t]*[-+]?[0-9]+")


@dataclass
class RunningTask:
    claim: Claim
    pid: int
    pidfd: int
    started: float
    started_mono: float
    out_part: str
    err_part: str
    out_fd: int = -1
    err_fd: int = -1
    peak_rss: int = 0
    rss: int = 0
    mem_s: float = 0.0  # byte-seconds held up to ``seen``, the last sample
    seen: float = 0.0
    samples: int = 0
    trace: Trace = field(default_factory=lambda: Trace([]))  # memory over its life, sampled
    kill_reason: str | None = None
    kill_deadline: float | None = None
    returncode: int | None = None  # still None once ended: its exit status was lost
    ended: float = 0.0
    ended_mono: float = 0.0
    spawn_error: str | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return self.claim.task_id


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def close_inherited_fds() -> None:
    """Make every descriptor above stderr close on exec. ``posix_spawn`` does not close
    descriptors the way Popen's ``close_fds`` does; Python opens its own ones non-inheritable,
    so only what the worker itself inherited needs this, once."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, closed by now


class Runner:
    """Starts, watches and cleans up the processes of tasks on this node."""

    def __init__(self, results_dir: str, workdir: str, python: str, tail_bytes: int,
                 extra_env: dict[str, str], withheld: tuple[str, ...] = ()) -> None:
        """Tasks get the worker's environment plus ``extra_env``, without the variables named
        in ``withheld`` (secrets: a task that prints its environment would put them in its
        output files)."""
        self.results = os.path.abspath(results_dir)
        self.workdir = os.path.abspath(workdir) if workdir else "/"
        self.tail_bytes = tail_bytes
        self.base_env = {k: v for k, v in os.environ.items() if k not in withheld}
        self.base_env.update(extra_env)
        search = self.base_env.get("PATH", os.defpath)
        # Resolved once, and absolute: a task's own PATH does not change which interpreter runs
        # it, and a relative one would be looked up from each task's working directory.
        self.bash = os.path.abspath(shutil.which("bash", path=search) or "/bin/bash")
        self.python = os.path.abspath(shutil.which(python, path=search) or python)
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._made: set[str] = set()
        self._plain_env = not _needs_bash(self.base_env)

    def shard(self, task_id: str) -> str:
        """Results fan out over 256 directories: a million files in one folder hurts MooseFS."""
        d = f"{self.results}/{task_id[:2]}"
        if d not in self._made:
            os.makedirs(d, exist_ok=True)
            self._made.add(d)
        return d

    def open_part(self, task_id: str, path: str) -> int:
        """Open an attempt's output file in its shard. A shard made before may be gone since
        (``rm -rf results/*`` between two sweeps while the workers run, a file system
        remounted empty): it is made again, or every task of it would fail until a restart."""
        try:
            return os.open(path, _OUTPUT_FLAGS, 0o666)
        except FileNotFoundError:
            self._made.discard(os.path.dirname(path))
            self.shard(task_id)
            return os.open(path, _OUTPUT_FLAGS, 0o666)

    def unusable(self) -> str | None:
        """Why this node cannot start any task now, or None: the results directory takes no
        new file, or the default working directory cannot be entered (a MooseFS mount gone,
        read-only or failing). Asked after a task could not start, to tell a fault of the node
        from one of the task (its own directory, its program, one broken shard)."""
        # A name of this probe's own: the results directory is shared, and workers of cloned
        # node images run with the same pids, removing each other's probes.
        probe = f"{self.results}/.distcomp-probe-{socket.gethostname()}-{uuid.uuid4().hex}"
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            return f"results directory {self.results}: {exc.strerror}"
        try:
            os.chdir(self.workdir)
        except OSError as exc:
            return f"working directory {self.workdir}: {exc.strerror}"
        finally:
            os.chdir("/")
        return None

    def full(self) -> str | None:
        """Why the results directory cannot take a task's output now (no space or no inode
        left), or None. Asked when a task fails: on a full disk every task fails writing its
        output, with nothing in its tails to say so."""
        try:
            st = os.statvfs(self.results)
        except OSError as exc:
            return f"results directory {self.results}: {exc.strerror}"
        if st.f_bavail * st.f_frsize < _FULL_BELOW:
            return (f"results directory {self.results}: no space left "
                    f"({st.f_bavail * st.f_frsize} bytes free)")
        if st.f_files and st.f_favail == 0:
            return f"results directory {self.results}: no inode left"
        return None

    def final_paths(self, task_id: str) -> tuple[str, str]:
        d = f"{self.results}/{task_id[:2]}"
        return f"{d}/{task_id}.out", f"{d}/{task_id}.err"

    def part_paths(self, task_id: str, attempt: int) -> tuple[str, str]:
        """Where one attempt writes its output until the queue records it."""
        stem = f"{self.results}/{task_id[:2]}/{task_id}.a{attempt}"
        return f"{stem}.out", f"{stem}.err"

    def argv(self, claim: Claim) -> list[str]:
        if claim.type == "python":
            return [self.python, *shlex.split(claim.params)]
        return [self.bash, "-c", claim.params]

    def direct_argv(self, claim: Claim, env: dict[str, str]) -> tuple[str, list[str]] | None:
        """The program and argv bash would exec for a shell task made of plain words, or None
        when bash has to run it. A program that cannot be started this way (not found, not
        executable, a script without #!) is then left to bash, for bash's own behaviour."""
        if claim.type != "shell" or not _PLAIN_COMMAND.fullmatch(claim.params):
            return None
        words = claim.params.split()
        name = words[0]
        if name in _SHELL_WORDS or (name in ("true", "false") and len(words) == 2
                                    and words[1] in ("--help", "--version")):
            return None
        if (not self._plain_env or (claim.env and _needs_bash(claim.env))
                or _shell_level(env.get("SHLVL")) is None):
            return None
        if "/" in name:
            return name, words
        program = find_program(name, env.get("PATH"))
        return (program, words) if program else None

    def start(self, claim: Claim) -> RunningTask:
        """Start the task; one that cannot be started (its output files or directory cannot
        be made, its program cannot be run) comes back ended, with ``spawn_error`` saying why."""
        env = {**self.base_env, **claim.env} if claim.env else dict(self.base_env)
        env["DISTCOMP_TASK_ID"] = claim.task_id
        env["DISTCOMP_ATTEMPT"] = str(claim.attempt)
        task = RunningTask(claim, 0, -1, time.time(), time.monotonic(),
                           *self.part_paths(claim.task_id, claim.attempt))
        try:
            self.shard(claim.task_id)
            task.out_fd = self.open_part(claim.task_id, task.out_part)
            task.err_fd = self.open_part(claim.task_id, task.err_part)
            # posix_spawn cannot change directory in the child, so the worker steps into the
            # task's directory around the spawn; the path is looked up again for every task
            # (a remounted shared filesystem is found), and the worker holds no directory open.
            # A relative cwd is below the workdir: the worker's own directory is "/" between
            # spawns, and whatever it was started in before the first.
            os.chdir(os.path.join(self.workdir, claim.cwd) if claim.cwd else self.workdir)
            try:
                task.pid = self._spawn(claim, env, task)
            finally:
                os.chdir("/")
            try:
                task.pidfd = os.pidfd_open(task.pid)
            except OSError:
                # The task runs, but the worker could not watch it (EMFILE): it is killed and
                # reaped before it is reported as not started.
                self.signal_tree(task, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(task.pid, 0)
                raise
        except (OSError, ValueError) as exc:
            reason = f"cannot start: {getattr(exc, 'strerror', None) or exc}"
            if isinstance(exc, OSError) and exc.filename:
                reason += f": {exc.filename}"
            task.returncode, task.spawn_error = 127, reason
            task.ended, task.ended_mono = task.started, task.started_mono
            self.close_output(task)
        return task

    def _spawn(self, claim: Claim, env: dict[str, str], task: RunningTask) -> int:
        """Start the task in the current directory (a relative PATH entry is looked up
        there, as bash would)."""
        actions = [(os.POSIX_SPAWN_DUP2, self._devnull, 0),
                   (os.POSIX_SPAWN_DUP2, task.out_fd, 1),
                   (os.POSIX_SPAWN_DUP2, task.err_fd, 2)]
        direct = self.direct_argv(claim, env)
        if direct:
            program, argv = direct
            # What bash would have put in the environment of the program it execs.
            for name in _DROPPED:
                env.pop(name, None)
            if "OLDPWD" in env and not os.path.isdir(env["OLDPWD"]):
                del env["OLDPWD"]
            env["PWD"] = _working_directory(env.get("PWD"))
            env["_"] = program
            env["SHLVL"] = _shell_level(env.get("SHLVL")) or "0"
            try:
                return os.posix_spawn(program, argv, env, setsid=True,
                                      setsigdef=_DEFAULT_SIGNALS, file_actions=actions)
            except OSError:
                pass  # bash reports it, or runs a script that has no #! line
        argv = self.argv(claim)
        return os.posix_spawn(argv[0], argv, env, setsid=True, setsigdef=_DEFAULT_SIGNALS,
                              file_actions=actions)

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

    @staticmethod
    def exited(task: RunningTask) -> bool:
        """Whether the main process has ended and waits to be reaped: it ended on its own, so a
        kill decided on older observations (eviction, timeout, cancel, stop) would only mislabel
        it."""
        if task.ended:
            return True
        if task.pid <= 0:
            return False
        try:
            return os.waitid(os.P_PID, task.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # reaped by someone else: it has ended (see ``try_reap``)

    def kill(self, task: RunningTask, reason: str, grace: float) -> None:
        """TERM now, KILL once the grace period is over (see ``escalate``). The TERM reaches
        the processes the task moved to groups of their own too (a script's `set -m` jobs):
        they got only the KILL, without their grace period to save their work."""
        if task.kill_reason is None:
            task.kill_reason = reason
        if task.kill_deadline is None:
            self.signal_tree(task, signal.SIGTERM, sweep=True)
            task.kill_deadline = time.monotonic() + grace

    def escalate(self, task: RunningTask) -> None:
        self.signal_tree(task, signal.SIGKILL, sweep=True)

    def try_reap(self, task: RunningTask) -> bool:
        """Collect the main process if it exited; kill what it left behind in its group and
        read the tails of its output. A process that something else reaped (the kernel does
        when SIGCHLD is ignored) took its exit status with it: ``returncode`` stays None."""
        if task.ended:
            return True
        usage = None
        try:
            exited = os.waitid(os.P_PID, task.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            log.warning("task %s: its process %d was reaped by someone else; its exit status is "
                        "lost", task.task_id, task.pid)
        else:
            if exited is None:
                return False
            # The zombie still holds the pid, so the group id cannot have been reused yet.
            self.signal_tree(task, signal.SIGKILL)
            _, status, usage = os.wait4(task.pid, 0)
            task.returncode = os.waitstatus_to_exitcode(status)
        # A child's ru_maxrss starts from the peak of the memory it was forked or vforked
        # with: Linux keeps the high-water mark of the pre-exec address space, which is this
        # worker's. Only a larger value is the task's own; below it the samples are all there is.
        own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if usage is not None and usage.ru_maxrss > own_peak:
            task.peak_rss = max(task.peak_rss, usage.ru_maxrss * 1024)
        task.ended, task.ended_mono = time.time(), time.monotonic()
        if task.pidfd >= 0:
            os.close(task.pidfd)
            task.pidfd = -1
        task.stdout_tail = self._tail(task, task.out_fd)
        task.stderr_tail = self._tail(task, task.err_fd)
        self.close_output(task)
        return True

    def _tail(self, task: RunningTask, fd: int) -> str:
        """The end of an output file, or nothing when it cannot be read (an I/O error of the
        shared file system): the task's outcome is reported all the same."""
        if fd < 0:
            return ""
        try:
            size = os.fstat(fd).st_size
            if not size:
                return ""
            start = max(0, size - self.tail_bytes)
            return os.pread(fd, size - start, start).decode("utf-8", errors="replace")
        except OSError as exc:
            log.warning("task %s: cannot read the tail of its output: %s", task.task_id, exc)
            return ""

    @staticmethod
    def close_output(task: RunningTask) -> None:
        """Close the output files. A close can report a write-back error of the shared file
        system; the descriptor is released all the same."""
        for fd in (task.out_fd, task.err_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as exc:
                    log.warning("task %s: closing its output: %s", task.task_id, exc)
        task.out_fd = task.err_fd = -1

    def keep(self, task: RunningTask) -> None:
        """The queue recorded this attempt: its output becomes the task's output."""
        self.keep_attempt(task.task_id, task.claim.attempt)

    def keep_attempt(self, task_id: str, attempt: int) -> bool:
        """Rename one attempt's files to the task's; False when neither was renamed (renamed
        already, never on this file system, or the file system failed: that is logged, and the
        outcome stays recorded without its files)."""
        moved = False
        for part, final in zip(self.part_paths(task_id, attempt), self.final_paths(task_id)):
            try:
                os.replace(part, final)
                moved = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("task %s: cannot rename the output of attempt %d: %s", task_id,
                            attempt, exc)
        return moved

    def discard(self, task: RunningTask) -> None:
        self.discard_attempt(task.task_id, task.claim.attempt)

    def discard_attempt(self, task_id: str, attempt: int) -> None:
        for part in self.part_paths(task_id, attempt):
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("task %s: cannot remove the output of attempt %d: %s", task_id,
                            attempt, exc)


def _needs_bash(env: dict[str, str]) -> bool:
    return any(name in _BASH_VARIABLES or name.startswith("BASH_FUNC_") for name in env)


def _working_directory(inherited: str | None) -> str:
    """PWD as bash passes it on: the inherited value when it names the current directory
    (a path through a symbolic link stays as it is), else the physical path."""
    if inherited and inherited.startswith("/"):
        try:
            if os.path.samefile(inherited, "."):
                return inherited
        except OSError:
            pass
    return os.getcwd()


def _shell_level(value: str | None) -> str | None:
    """SHLVL as bash passes it on to a command it execs, or None for a level so high that
    bash warns about it."""
    if not value or not _LEVEL.fullmatch(value):
        return "0"
    level = int(value)
    if level >= 999:
        return None
    return str(max(level, 0))


def find_program(name: str, search: str | None) -> str | None:
    """The path bash's PATH search finds for ``name`` (an empty entry is the current
    directory), or None."""
    if search is None or "~" in search:
        return None  # bash expands a tilde in PATH; left to bash, so is the search
    for directory in search.split(":"):
        path = f"{directory or '.'}/{name}"
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


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
