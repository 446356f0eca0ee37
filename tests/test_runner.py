"""The runner starts a shell task made of plain words without bash; what the task sees and does
must be what ``bash -c`` would have given it, byte for byte."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distcomp.queue import Claim
from distcomp.runner import _BASH_VARIABLES, Runner, RunningTask
from tests.helpers import wait_for

SCRIPT = '#!/bin/sh\necho "$0|$*|$PWD|$(pwd -P)"\n'


def claim(params: str, cwd: str = "", env: dict[str, str] | None = None,
          attempt: int = 1) -> Claim:
    return Claim(task_id=f"t{abs(hash((params, cwd))):x}", attempt=attempt, type="shell",
                 params=params, cwd=cwd, env=env or {}, timeout_s=0.0, mem_mb=0, cpu=1.0)


def run(runner: Runner, c: Claim) -> RunningTask:
    task = runner.start(c)
    if task.spawn_error is None:
        select.select([task.pidfd], [], [])  # readable once the process has exited
        assert runner.try_reap(task)
    runner.discard(task)
    return task


def under_bash(runner: Runner, c: Claim) -> tuple[int, str, str]:
    env = {**runner.base_env, **c.env, "DISTCOMP_TASK_ID": c.task_id,
           "DISTCOMP_ATTEMPT": str(c.attempt)}
    proc = subprocess.run([runner.bash, "-c", c.params], cwd=c.cwd or runner.workdir, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          start_new_session=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def place(tmp_path: Path) -> Path:
    (tmp_path / "bin").mkdir()
    for name, text in (("show", SCRIPT), ("bin/onpath", SCRIPT),
                       ("noshebang", 'echo "no #! line: $1"\n'), ("notexec", SCRIPT)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o644 if name == "notexec" else 0o755)
    (tmp_path / "adir").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    return tmp_path


@pytest.fixture
def runner(place: Path, monkeypatch: pytest.MonkeyPatch) -> Runner:
    monkeypatch.setenv("PATH", f"{place}/bin:{os.environ['PATH']}")
    for name in os.environ:
        if name in _BASH_VARIABLES or name.startswith("BASH_FUNC_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("SHLVL", raising=False)
    monkeypatch.setenv("PWD", "/nonexistent")
    monkeypatch.setenv("PS1", "$ ")  # bash drops it
    return Runner(str(place / "results"), str(place), "python3", 4096, {})


@pytest.mark.parametrize("params,direct", [
    ("env", True), ("true 1", True), ("false 2", True), ("  sleep 0  ", True),
    ("./show a b=c d%e", True), ("onpath x,y:z", True),
    # Tried directly, left to bash when the kernel refuses them.
    ("./noshebang 7", True), ("./notexec", True), ("./adir", True),
    ("no-such-program 1", False), ("true --help", False), ("true --version", False),
    ("echo plain words", False),
])
def test_plain_commands_behave_as_under_bash(runner: Runner, place: Path, params: str,
                                             direct: bool) -> None:
    c = claim(params)
    assert (runner.direct_argv(c, dict(runner.base_env)) is not None) == direct
    task = run(runner, c)
    got = (task.returncode, task.stdout_tail, task.stderr_tail)
    want = under_bash(runner, c)
    if params == "env":  # the same variables, in whatever order each put them
        got, want = (sorted(got[1].splitlines()), (sorted(want[1].splitlines())))
    assert got == want


@pytest.mark.parametrize("params,env,cwd", [
    *(("env", {"SHLVL": level}, "") for level in ("4", "-5", "007", " 3", "3x", "3_0", "998",
                                                  "999", "lots")),
    ("show 1", {"PATH": f"{os.defpath}:"}, "."),  # an empty entry: the current directory
    ("env", {}, "link"), ("env", {"PWD": "LINK"}, "link"),  # PWD naming it through a link
    ("env", {"OLDPWD": "LINK"}, ""), ("env", {"OLDPWD": "/nonexistent"}, ""),
])
def test_what_bash_would_set_for_the_program(runner: Runner, place: Path, params: str,
                                              env: dict[str, str], cwd: str) -> None:
    env = {k: str(place / "link") if v == "LINK" else v for k, v in env.items()}
    c = claim(params, cwd=str(place / cwd) if cwd else "", env=env)
    task = run(runner, c)
    rc, out, err = under_bash(runner, c)
    assert (task.returncode, sorted(task.stdout_tail.splitlines()), task.stderr_tail) == (
        rc, sorted(out.splitlines()), err)


@pytest.mark.parametrize("params", [
    "echo hi", "x=1 env", "env 'a'", 'env "a"', "env $HOME", "env > out", "env; env",
    "env && env", "env | cat", "env *", "env ?", "~/show", "env # note", "cd /", "exit 3",
    "time env", "%1", "env {a,b}", "env a\\ b", "env\nenv", "env &", "env (x)", "env é",
    "", "   ", "true --help", ". ./show", "[ -e x ]",
])
def test_anything_more_than_plain_words_goes_to_bash(runner: Runner, params: str) -> None:
    assert runner.direct_argv(claim(params), dict(runner.base_env)) is None


def test_plain_words_start_directly(runner: Runner, place: Path) -> None:
    env = dict(runner.base_env)
    assert runner.direct_argv(claim("true 1"), env) == (
        f"{'/usr/bin' if os.path.exists('/usr/bin/true') else '/bin'}/true", ["true", "1"])
    assert runner.direct_argv(claim(" ./show a=b  c "), env) == ("./show", ["./show", "a=b", "c"])
    assert runner.direct_argv(claim("onpath"), env) == (f"{place}/bin/onpath", ["onpath"])
    assert runner.direct_argv(claim("no-such-program"), env) is None


@pytest.mark.parametrize("name,value", [
    ("SHELLOPTS", "xtrace"), ("BASH_ENV", "STARTUP"), ("BASH_FUNC_env%%", "() { echo f; }"),
    ("EXECIGNORE", "*/env"),
])
def test_variables_that_change_what_bash_does_keep_bash(runner: Runner, place: Path,
                                                        name: str, value: str) -> None:
    """From the task's environment or the worker's, these make bash print a trace, read a
    start-up file, call an exported function or skip programs: bash must run the task."""
    startup = place / "startup"
    startup.write_text("echo from the start-up file\n")
    value = value.replace("STARTUP", str(startup))
    c = claim("env A=1", env={name: value})
    assert runner.direct_argv(c, {**runner.base_env, **c.env}) is None
    task = run(runner, c)
    rc, out, err = under_bash(runner, c)
    assert (task.returncode, sorted(task.stdout_tail.splitlines()), task.stderr_tail) == (
        rc, sorted(out.splitlines()), err)
    worker_wide = Runner(runner.results, runner.workdir, "python3", 4096, {name: value})
    assert worker_wide.direct_argv(claim("env A=1"), dict(worker_wide.base_env)) is None


def test_peak_memory_is_the_tasks_own_not_the_workers(runner: Runner) -> None:
    # Linux starts a child's ru_maxrss at the peak of the address space it was forked with,
    # the worker's: without the guard a task that uses next to nothing would report at least
    # the worker's own peak (here inflated by the ballast), and be charged that much.
    ballast = bytearray(200 << 20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))
    small = run(runner, claim("true 1"))
    grow = "b = bytearray(400 << 20); b[::4096] = b'\\1' * len(range(0, len(b), 4096))"
    big = run(runner, claim(f'python3 -c "{grow}"'))
    assert small.returncode == 0 and big.returncode == 0
    assert small.peak_rss < 100 << 20, small.peak_rss
    assert big.peak_rss >= 400 << 20, "a task's own peak above the worker's is still recorded"
    del ballast


def test_a_relative_cwd_is_below_the_workdir(runner: Runner, place: Path) -> None:
    """Every time, whatever directory the worker process was started in: the worker steps back
    to "/" after each spawn, so a cwd taken as relative to its own directory named another
    place for the first task than for the rest."""
    c = claim("pwd", cwd="adir")
    first, second = run(runner, c), run(runner, c)
    assert [(t.spawn_error, t.stdout_tail) for t in (first, second)] == \
        [(None, f"{place}/adir\n")] * 2


def test_output_that_cannot_be_read_or_closed_leaves_the_outcome(runner: Runner,
                                                                  place: Path) -> None:
    """A shared file system can fail reading or closing the output files (EIO, ESTALE): the
    task's exit status is still collected and the worker goes on. Here the stdout descriptor
    is one that cannot be read (a directory) and stderr's is closed behind the runner's back."""
    task = runner.start(claim("false 1"))
    unreadable = os.open(place / "adir", os.O_RDONLY)
    os.close(task.out_fd)
    task.out_fd = unreadable
    os.close(task.err_fd)
    select.select([task.pidfd], [], [])
    assert runner.try_reap(task)
    assert (task.returncode, task.stdout_tail, task.stderr_tail) == (1, "", "")
    assert (task.out_fd, task.err_fd) == (-1, -1)
    runner.discard(task)


def test_a_task_the_runner_cannot_watch_is_killed_and_reaped(runner: Runner) -> None:
    """The task was spawned but no descriptor was left to watch it (EMFILE from pidfd_open):
    it is reported as not started, so it must not run on, nor stay behind as a zombie."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (max(map(int, os.listdir("/proc/self/fd"))) + 16, hard))
    fillers: list[int] = []
    try:
        with pytest.raises(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        os.close(fillers.pop())
        os.close(fillers.pop())  # room for the two output files, none for the pidfd
        task = runner.start(claim("sleep 30"))
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    runner.discard(task)
    assert task.spawn_error == "cannot start: Too many open files" and task.pid > 0
    try:
        left = os.waitpid(task.pid, os.WNOHANG)
    except ChildProcessError:
        left = None  # reaped
    if left is not None:
        os.killpg(task.pid, signal.SIGKILL)
        os.waitpid(task.pid, 0)
    assert left is None, "the task's process was left running, unreaped"



def test_a_shard_removed_while_the_worker_runs_is_made_again(runner: Runner, place: Path) -> None:
    """The runner remembers which result shards it made; one removed since (``rm -rf
    results/*`` between sweeps, workers still up) used to fail every task of it with 'cannot
    start' until the worker restarted, each retry too, until the task failed for good."""
    first = claim("true 1")
    assert run(runner, first).spawn_error is None
    shutil.rmtree(place / "results")
    again = claim("echo again", attempt=2)
    again.task_id = first.task_id  # the same shard
    task = runner.start(again)
    assert task.spawn_error is None, task.spawn_error
    select.select([task.pidfd], [], [])
    assert runner.try_reap(task)
    assert task.returncode == 0
    assert Path(task.out_part).read_text() == "again\n"
    runner.discard(task)


def test_a_node_that_cannot_start_tasks_says_why(tmp_path, monkeypatch):
    """What tells a fault of the node (no new file in the results directory, no way into the
    working directory) from one of a task, once a task could not start."""
    monkeypatch.chdir(tmp_path)  # the probe leaves the process in "/", as a worker is
    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    work.mkdir()
    runner = Runner(str(results), str(work), "python3", 4096, {})
    assert runner.unusable() is None
    assert os.getcwd() == "/"
    assert list(results.iterdir()) == []  # the probe leaves nothing
    work.rmdir()
    assert runner.unusable() == f"working directory {work}: No such file or directory"
    results.rmdir()
    results.write_text("")
    assert runner.unusable() == f"results directory {results}: Not a directory"


def test_the_probe_does_not_meet_another_workers_of_the_same_pid(tmp_path, monkeypatch):
    """Workers of cloned node images run with the same pids and share the results directory:
    each named its probe by its pid alone, and one removed the other's, which then took its
    node for broken (the task requeued, claims paused). Here the other worker's probe is a
    directory of that name."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    (results / f".distcomp-probe-{os.getpid()}").mkdir(parents=True)
    runner = Runner(str(results), str(tmp_path), "python3", 4096, {})
    assert runner.unusable() is None
    assert [p.name for p in results.iterdir()] == [f".distcomp-probe-{os.getpid()}"]


def test_a_relative_python_runs_from_every_working_directory(place, monkeypatch):
    """`--python venv/bin/python` passed the worker's start-up check from its launch directory,
    then every python task failed: the spawn happens in the task's working directory."""
    (place / "venv/bin").mkdir(parents=True)
    (place / "venv/bin/python").symlink_to(sys.executable)
    monkeypatch.chdir(place)
    runner = Runner(str(place / "results"), str(place / "adir"), "venv/bin/python", 4096, {})
    monkeypatch.chdir("/")
    task = run(runner, dataclasses.replace(claim("-c 'print(42)'"), type="python"))
    assert (task.spawn_error, task.returncode) == (None, 0), task.spawn_error


def test_writing_to_dev_stderr_by_name_leaves_no_hole_in_the_output(runner):
    """`echo msg > /dev/stderr` opens the output file again and truncates it, while the
    task's descriptor 2 wrote on at its old offset: the file held NUL bytes before the next
    line. Appending, it holds what came after the truncation, in order."""
    task = runner.start(claim("echo first >&2; echo warning > /dev/stderr; echo done >&2"))
    select.select([task.pidfd], [], [])
    assert runner.try_reap(task)
    assert Path(task.err_part).read_bytes() == b"warning\ndone\n"
    runner.discard(task)


def test_a_tilde_in_path_is_left_to_bash_to_expand(runner, place, monkeypatch):
    """bash finds a command in a PATH entry written `~/bin`; the worker's own search, used for
    commands of plain words, did not and ran another program of the same name."""
    (place / "home/bin").mkdir(parents=True)
    (place / "home/bin/onpath").write_text('#!/bin/sh\necho home\n')
    (place / "home/bin/onpath").chmod(0o755)
    c = claim("onpath", env={"HOME": str(place / "home"), "PATH": f"~/bin:{place}/bin:/usr/bin"})
    assert runner.direct_argv(c, {**runner.base_env, **c.env}) is None
    assert under_bash(runner, c)[1] == "home\n"


def test_a_full_results_directory_is_named_as_the_fault(tmp_path):
    """On a full disk every task failed writing its output, with empty tails, and nothing
    said why; the worker asks ``full`` when a task fails."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        runner = Runner(str(mount), str(tmp_path), "python3", 4096, {})
        assert runner.full() is None
        with open(mount / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 65536)
        assert runner.full().startswith(f"results directory {mount}: no space left (")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_kill_gives_the_tasks_other_process_groups_their_term_too(runner, place):
    """A timeout, eviction or cancel sent TERM to the task's process group only: a process the
    task had moved to a group of its own got no grace period, only the KILL after it."""
    marker = place / "termed"
    code = ("import os, signal, sys, time; os.setpgid(0, 0); "
            "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w').close(), "
            "os._exit(0))); print('ready', flush=True); time.sleep(60)")
    task = runner.start(claim(f"{sys.executable} -c \"{code}\" {marker} & wait"))
    try:
        wait_for(lambda: b"ready" in Path(task.out_part).read_bytes(), 30,
                 "the child to take its own group")
        runner.kill(task, "timeout", 30)
        wait_for(marker.exists, 30, "the other group's TERM")
    finally:
        runner.escalate(task)
        select.select([task.pidfd], [], [], 30)
        runner.try_reap(task)
        runner.discard(task)
