"""The distcomp command as people and playbooks use it: outputs, exit codes, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

from distcomp import queue as queue_module
from distcomp.cli import EXPORT_COLUMNS
from distcomp.queue import Queue
from distcomp.redis_client import Redis
from distcomp.spec import parse_taskfile
from tests.conftest import RedisServer
from tests.helpers import free_port, wait_for


def keys_of(client, namespace):
    return sorted(client.scan_iter(match=f"{namespace}:*"))


def test_submit_json_and_idempotent_resubmission(cli, tmp_path):
    f = tmp_path / "tasks.txt"
    f.write_text("# sweep\nshell:4:2:2:./cachesim --trace /mnt/mfs/t1.bin --size 0.1:0.5\n"
                 "python:1:0.5:1:sim.py --seed 3\n\n")
    first = cli("submit", "--json", str(f), check=True)
    assert json.loads(first.stdout) == {"added": 2, "existing": 0, "duplicates": 0, "invalid": 0}
    second = cli("submit", "--json", str(f), check=True)
    assert json.loads(second.stdout) == {"added": 0, "existing": 2, "duplicates": 0, "invalid": 0}
    status = json.loads(cli("status", "--json", check=True).stdout)
    assert (status["todo"], status["running"], status["finished"], status["failed"]) == \
        (2, 0, 0, 0)


def test_invalid_file_is_rejected_whole_with_line_numbers(cli, tmp_path, client, namespace):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"shell:1:0:1:echo ok\nshell:1:-1:1:echo neg\n# c\nperl:1:0:1:x\n"
                  b"shell:1:0:1:\nshell:1:0:1:\xff\n")
    proc = cli("submit", str(f))
    assert proc.returncode == 2
    lines = proc.stderr.decode().splitlines()
    assert lines[:4] == [
        f"{f}:2: min_dram_gb must be >= 0, got -1.0",
        f"{f}:4: unknown task type 'perl' (expected one of: shell, python)",
        f"{f}:5: params is empty: nothing to run",
        f"{f}:6: not valid UTF-8 (byte 0xff at column 13)",
    ]
    assert "nothing was submitted" in lines[4]
    assert keys_of(client, namespace) == []


def test_skip_invalid_submits_the_good_lines(cli, tmp_path):
    f = tmp_path / "mixed.txt"
    f.write_text("shell:1:0:1:echo ok\nnonsense\nshell:2:0:1:echo ok2\n")
    proc = cli("submit", "--skip-invalid", "--json", str(f))
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"added": 2, "existing": 0, "duplicates": 0, "invalid": 1}
    assert proc.stderr.decode().startswith(f"{f}:2: expected type:priority")


def test_submit_from_stdin(cli):
    proc = cli("submit", "--json", "-", input=b"shell:0:0:1:echo from stdin\n")
    assert json.loads(proc.stdout)["added"] == 1


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "missing.txt: no such file"),
    (lambda p: p, "is a directory, expected a taskfile"),
])
def test_unreadable_taskfiles(cli, tmp_path, make, message):
    proc = cli("submit", str(make(tmp_path)))
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_redis_unreachable_is_one_line(cli, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("shell:0:0:1:true\n")
    port = free_port()
    proc = cli("submit", str(f), env={"DISTCOMP_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.startswith(f"distcomp: error: cannot reach Redis at redis://127.0.0.1:{port}/0")
    assert err.count("\n") == 1


def test_wrong_and_missing_password(cli, tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("auth"), password="s3cret-pw")
    server.start()
    try:
        env = {"DISTCOMP_REDIS_URL": server.url}
        wrong = cli("status", env={**env, "DISTCOMP_REDIS_PASSWORD": "nope"})
        assert wrong.returncode == 1
        assert wrong.stderr.decode() == (
            f"distcomp: error: Redis at {server.url} refused the password (check "
            "DISTCOMP_REDIS_PASSWORD, --password-file or the config file)\n")
        missing = cli("status", env=env)
        assert missing.returncode == 1 and "requires a password" in missing.stderr.decode()
        pw = tmp_path_factory.mktemp("pw") / "pass"
        pw.write_text("s3cret-pw\n")
        ok = cli("--password-file", str(pw), "status", "--json", env=env)
        assert ok.returncode == 0, ok.stderr
        assert b"s3cret-pw" not in ok.stdout + ok.stderr
    finally:
        server.stop()


def test_a_redis_url_option_distcomp_does_not_know_is_refused_without_the_password(cli):
    out = cli("status", env={"DISTCOMP_REDIS_URL": "redis://:pw-xyz@127.0.0.1:1/0?timeout=3"})
    assert (out.returncode, out.stderr.decode()) == (2, (
        "distcomp: error: Redis URL 'redis://:***@127.0.0.1:1/0?timeout=3': unsupported Redis "
        "URL option(s): timeout (supported: db, ssl_cert_reqs, ssl_ca_certs)\n"))


def test_show_unknown_id_and_prefix(cli, tmp_path):
    proc = cli("show", "0123456789abcdef")
    assert proc.returncode == 1
    assert proc.stderr.decode() == ("distcomp: error: unknown task id '0123456789abcdef' (see "
                                    "`distcomp status --state todo` for ids)\n")
    cli("submit", "-", input=b"shell:0:0:1:echo show me\n", check=True)
    listed = json.loads(cli("status", "--state", "todo", "--json", check=True).stdout)
    tid = listed["tasks"][0]["id"]
    shown = json.loads(cli("show", tid[:6], "--json", check=True).stdout)
    assert shown["id"] == tid and shown["params"] == "echo show me" and shown["state"] == "todo"


def test_show_names_the_worker_waiting_for_room_for_a_task(cli, queue, client, monkeypatch):
    """A task passed over for smaller ones is reserved by a worker that takes nothing worse
    until it has room for it (distcomp.queue, ``_CLAIM``): `show` says which, and `workers`
    says why that worker leaves smaller tasks be. A worker whose lease lapsed holds nothing,
    though the task still names it until the next claim reads it."""
    monkeypatch.setattr(queue_module, "CLAIM_RESERVE_AFTER_S", 0.0)
    cli("submit", "-", input=b"shell:0:0.25:1:echo a\nshell:0:0.75:1:echo big\n"
        b"shell:0:0.25:1:echo b\nshell:0:0.25:1:echo c\n", check=True)
    queue.register("w1", "tok-w1", 60_000, {"host": "test", "pid": 1, "room_mb": 1000})
    assert len(queue.claim("w1", "tok-w1", 300, 8, 1) + queue.claim("w1", "tok-w1", 300, 8, 1)) == 2
    assert queue.claim("w1", "tok-w1", 300, 8, 1) == []
    big = json.loads(cli("status", "--state", "todo", "--json", check=True).stdout)["tasks"][0]
    shown = cli("show", big["id"], check=True).stdout.decode()
    assert "\nreserved_by  w1\n" in shown, shown
    listed = json.loads(cli("workers", "--json", check=True).stdout)
    assert [(w["name"], w["reserving"]) for w in listed] == [("w1", big["id"])]
    # Seconds since the epoch, as `show`'s times are (Redis keeps milliseconds).
    assert abs(listed[0]["reserving_since"] - time.time()) < 3600
    assert f"w1 waits for room for task {big['id']}, passed over for smaller ones: it takes " \
        "nothing ranked below it meanwhile\n" in cli("workers", check=True).stdout.decode()

    client.delete(queue.key("lease", "w1"))
    assert client.hget(queue.key("t", big["id"]), "reserved_by") == b"w1"
    assert json.loads(cli("show", big["id"], "--json", check=True).stdout)["reserved_by"] == ""
    assert "reserved_by" not in cli("show", big["id"], check=True).stdout.decode()
    assert json.loads(cli("workers", "--json", check=True).stdout)[0]["reserving"] == ""
    assert "waits for room" not in cli("workers", check=True).stdout.decode()


def test_cancel_and_retry_from_the_cli(cli):
    cli("submit", "-", input=b"shell:0:0:1:echo a\nshell:0:0:1:echo b\n", check=True)
    out = json.loads(cli("cancel", "--all", "--json", check=True).stdout)
    assert out == {"cancelled": 2, "queued": 2, "running": 0}
    assert json.loads(cli("status", "--json").stdout)["failed"] == 2
    assert json.loads(cli("retry", "--all", "--json", check=True).stdout) == {"retried": 2}
    assert json.loads(cli("status", "--json").stdout)["todo"] == 2
    usage = cli("retry")
    assert usage.returncode == 2 and b"give task ids, or --all" in usage.stderr


@pytest.mark.parametrize("command", ["cancel", "retry"])
def test_ids_with_all_are_refused_before_connecting(cli, queue, command):
    """cancel --all ID used to ignore the id and cancel every task."""
    cli("submit", "-", input=b"shell:0:0:1:echo a\nshell:0:0:1:echo b\n", check=True)
    tid = queue.ids_in_state("todo")[0]
    for extra in ({}, {"DISTCOMP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}):
        proc = cli(command, "--all", tid, env=extra)
        assert (proc.returncode, proc.stderr.decode()) == (
            2, "distcomp: error: give task ids or --all, not both\n")
    assert queue.counts()["todo"] == 2


def test_cancel_all_misses_no_task_moving_between_running_and_todo(
        cli, queue, redis_server, namespace):
    """`cancel --all` listed the todo tasks and then the running ones in another read: a task
    that went from running back to todo in between (a retryable failure, an eviction, a reap)
    was in neither list, ran again and could finish. Ten workers evict tasks back to the queue
    as fast as they can claim them while the cancel runs; no task may come out of it alive."""
    cli("submit", "-", input="".join(f"shell:{9 if i < 10 else 0}:0:1:echo {i}\n"
                                     for i in range(20_000)).encode(), check=True)
    cancelled, bounced = threading.Event(), threading.Barrier(11)

    def bounce(name: str) -> None:
        q = Queue(Redis(redis_server.url), namespace)
        assert q.register(name, f"tok-{name}", 60_000, {"host": "test", "pid": 1,
                                                         "room_mb": 8192})[0]
        after = 0  # bounces since the cancel ended: a task it missed would bounce for ever
        waited = False
        while after < 2_000:
            claims = q.claim(name, f"tok-{name}", 1e9, 1e9, 1, avoid_window_s=0)
            if not claims:
                if cancelled.is_set():
                    return
                continue
            c = claims[0]
            q.evict(c.task_id, name, c.attempt, 1, 10**9, "bounced", "budget", {})
            if not waited:
                bounced.wait(30)
                waited = True
            after += cancelled.is_set()

    threads = [threading.Thread(target=bounce, args=(f"b{i}",)) for i in range(10)]
    for t in threads:
        t.start()
    bounced.wait(30)
    try:
        out = json.loads(cli("cancel", "--all", "--json", check=True).stdout)
    finally:
        cancelled.set()
        for t in threads:
            t.join(120)
    counts = queue.counts()
    assert (counts["todo"], counts["running"], counts["failed"]) == (0, 0, 20_000), counts
    assert out["cancelled"] == 20_000, out


def test_a_closed_standard_output_is_refused_before_anything_is_done(
        redis_server, namespace, queue, tmp_path):
    """`distcomp submit f 1>&-` queued the tasks and then died with a traceback on its
    summary; `status` and `export` gave tracebacks too."""
    for args in (["submit", "-"], ["status"], ["export"]):
        proc = subprocess.run(["sh", "-c", 'exec "$0" -m distcomp "$@" 1>&-', sys.executable,
                               *args], input=b"shell:0:0:1:true\n", stderr=subprocess.PIPE,
                              env=_env(redis_server.url, namespace, tmp_path), timeout=60,
                              check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err == (
            "distcomp: error: standard output is closed: run it with an open one (> /dev/null "
            "to throw the output away)\n"), (args, err)
    assert queue.counts()["total"] == 0


def test_cancel_by_id_cancels_that_task_only(cli, queue):
    cli("submit", "-", input=b"shell:0:0:1:echo a\nshell:0:0:1:echo b\n", check=True)
    tid = queue.ids_in_state("todo")[0]
    out = json.loads(cli("cancel", tid[:8], "--json", check=True).stdout)
    assert out == {"cancelled": 1, "queued": 1, "running": 0}
    assert queue.ids_in_state("failed") == [tid] and queue.counts()["todo"] == 1
    # Said 0 and 0 with no hint why: the task had ended (here cancelled by the first call).
    assert cli("cancel", tid, check=True).stdout.decode() == (
        "cancelled 0 queued task(s); 0 running task(s) will be killed; 1 named had already "
        "ended (finished, failed or cancelled before)\n")
    other = queue.ids_in_state("todo")[0]
    assert cli("retry", other, tid, check=True).stdout.decode() == (
        "1 failed task(s) back in the queue; 1 named were not failed (todo, running or "
        "finished), left as they were\n")


def test_purge_needs_confirmation_and_keeps_foreign_keys(cli, client, namespace):
    client.set("someone-else:key", "1")
    cli("submit", "-", input=b"shell:0:0:1:echo a\n", check=True)
    assert cli("purge").returncode == 2
    assert cli("purge", "--yes", check=True).returncode == 0
    assert keys_of(client, namespace) == []
    assert client.get("someone-else:key") == b"1"


def test_bad_config_is_a_clear_error(cli, tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[worker]\nmemory_limit = lots\n")
    proc = cli("--config", str(conf), "status")
    assert proc.returncode == 2
    assert "cannot read size 'lots'" in proc.stderr.decode()


@pytest.mark.parametrize("line, message", [
    ("overcommit = lots", "[worker] overcommit must be a number or 'auto', got 'lots'"),
    ("overcommit = 4.5", "overcommit must be between 0.25 and 4 or 'auto', got 4.5"),
    ("own_cgroup = maybe", "[worker] own_cgroup must be yes or no, got 'maybe'"),
    ("max_tasks = 1.5", "[worker] max_tasks must be an integer, got '1.5'"),
    ("tail_bytes = 4k", "[worker] tail_bytes must be an integer, got '4k'"),
    ("kill_grace = soon", "[worker] kill_grace must be a number, got 'soon'"),
])
def test_bad_worker_keys_in_the_config_are_a_clear_error(cli, tmp_path, line, message):
    conf = tmp_path / "bad.conf"
    conf.write_text(f"[worker]\n{line}\n")
    proc = cli("--config", str(conf), "worker", "--results-dir", str(tmp_path / "results"),
               "--exit-when-empty")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_overcommit_auto_in_the_config_reaches_the_worker(cli, tmp_path):
    conf = tmp_path / "auto.conf"
    conf.write_text("[worker]\novercommit = Auto\n")
    proc = cli("--config", str(conf), "worker", "--results-dir", str(tmp_path / "results"),
               "--exit-when-empty")
    err = proc.stderr.decode()
    assert proc.returncode == 0 and ", overcommit auto), results in" in err, err


@pytest.mark.parametrize("value", ["0", "4.5", "nan"])
def test_worker_refuses_an_overcommit_out_of_range(cli, client, namespace, tmp_path, value):
    proc = cli("worker", "--overcommit", value, "--results-dir", str(tmp_path / "results"),
               "--exit-when-empty")
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "overcommit must be between 0.25 and 4 or 'auto', got" in err
    assert len(err.strip().splitlines()) == 1, err
    assert keys_of(client, namespace) == []


def test_worker_refuses_an_overcommit_that_is_not_a_number(cli, client, namespace, tmp_path):
    proc = cli("worker", "--overcommit", "lots", "--results-dir", str(tmp_path / "results"),
               "--exit-when-empty")
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.strip() == "distcomp: error: --overcommit must be a number or 'auto', got 'lots'"
    assert keys_of(client, namespace) == []


@pytest.mark.parametrize("value", ["1.5", "auto"])
def test_worker_takes_an_overcommit_and_says_so(cli, tmp_path, value):
    proc = cli("worker", "--overcommit", value, "--results-dir", str(tmp_path / "results"),
               "--exit-when-empty")
    err = proc.stderr.decode()
    assert proc.returncode == 0 and f", overcommit {value}), results in" in err, err


@pytest.mark.parametrize("args, message", [
    (["wait", "--interval", "-1"], "--interval must be a positive number of seconds, got -1"),
    (["wait", "--interval", "0"], "--interval must be a positive number of seconds, got 0"),
    (["wait", "--timeout", "-5"], "--timeout must be 0 (none) or a positive number of seconds"),
    (["watch", "--interval", "-0.5"], "--interval must be a positive number of seconds"),
    (["wait", "--interval", "inf"], "--interval must be at most 31536000 seconds (a year), got inf"),
    (["wait", "--interval", "1e300"], "--interval must be at most 31536000 seconds (a year)"),
    (["wait", "--interval", "nan"], "--interval must be a positive number of seconds, got nan"),
    (["wait", "--timeout", "inf"], "--timeout must be at most 31536000 seconds (a year), got inf"),
    (["watch", "--interval", "inf"], "--interval must be at most 31536000 seconds (a year)"),
])
def test_bad_intervals_are_one_line_errors(cli, args, message):
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)  # something to wait for
    proc = cli(*args)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [
    (["--wait", "--interval", "0"], "--interval must be a positive number of seconds, got 0"),
    (["--wait", "--timeout", "-1"], "--timeout must be 0 (none) or a positive number of seconds"),
    (["--wait", "--interval", "inf"], "--interval must be at most 31536000 seconds (a year)"),
    (["--timeout", "60"], "--timeout and --interval only apply with --wait"),
    (["--interval", "2"], "--timeout and --interval only apply with --wait"),
])
def test_bad_submit_wait_options_submit_nothing(cli, queue, args, message):
    proc = cli("submit", "-", *args, input=b"shell:0:0:1:true\n")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert queue.counts()["todo"] == 0


def test_export_is_the_index_of_the_results(cli, tmp_path):
    f = tmp_path / "tasks.txt"
    f.write_text('shell:2:0.5:1:echo "a, b"; echo err >&2\n'
                 '{"type": "shell", "params": "exit 3", "max_retries": 0}\n')
    cli("submit", str(f), check=True)
    cli("worker", "--exit-when-empty", "--results-dir", str(tmp_path / "results"),
        "--log-level", "warning", check=True)
    f2 = tmp_path / "later.txt"
    f2.write_text("python:0:0:1:never_run.py\n")
    cli("submit", str(f2), check=True)
    rows = list(csv.DictReader(io.StringIO(cli("export", check=True).stdout.decode())))
    by_params = {r["params"]: r for r in rows}
    assert list(rows[0]) == list(EXPORT_COLUMNS) and len(rows) == 3
    done, failed, todo = (by_params[p] for p in ('echo "a, b"; echo err >&2', "exit 3",
                                                 "never_run.py"))
    assert (done["state"], done["exit_code"], done["priority"], done["min_dram_gb"]) == \
        ("finished", "0", "2", "0.5")
    assert (failed["state"], failed["exit_code"], failed["reason"]) == \
        ("failed", "3", "exit code 3")
    assert (todo["state"], todo["exit_code"], todo["started"], todo["type"]) == \
        ("todo", "", "", "python")
    started = datetime.fromisoformat(done["started"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(done["ended"].replace("Z", "+00:00"))
    assert started.tzinfo is not None and started <= ended
    show = json.loads(cli("show", "--json", done["id"], check=True).stdout)
    assert show["stdout_tail"] == "a, b\n" and show["exit_code"] == 0
    assert (tmp_path / "results" / done["id"][:2] / f"{done['id']}.out").read_text() == "a, b\n"

    lines = cli("export", "--format", "jsonl", "--state", "failed", "--state", "todo",
                check=True).stdout.decode().splitlines()
    docs = {d["id"]: d for d in map(json.loads, lines)}
    assert set(docs) == {failed["id"], todo["id"]}
    assert docs[failed["id"]]["exit_code"] == 3 and docs[todo["id"]]["exit_code"] is None
    shown = json.loads(cli("show", "--json", failed["id"], check=True).stdout)
    assert docs[failed["id"]]["started"] == shown["started"] and shown["started"] > 0
    assert set(docs[todo["id"]]) == set(EXPORT_COLUMNS)

    out = tmp_path / "index.csv"
    proc = cli("export", "--state", "finished", "-o", str(out), check=True)
    assert proc.stdout.decode() == (f"{out}: 1 task(s) (todo 0, running 0, finished 1, "
                                    f"failed 0)\n")
    assert out.read_text().splitlines()[1].startswith(done["id"] + ",finished,")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "the umask's mode, not mkstemp's 0600"


def test_export_reads_every_task_once_and_nothing_else(cli, tmp_path, redis_server, namespace):
    # More tasks than one read of the export (1,000), and a namespace whose keys share the
    # prefix: <namespace>:t:... are task keys of this one only when a task id follows.
    f = tmp_path / "many.txt"
    f.write_text("".join(f"shell:0:0:1:true {i}\n" for i in range(2500)))
    ids = {t.task_id for t in parse_taskfile(f.read_bytes()).tasks}
    Queue(Redis(redis_server.url), f"{namespace}:t").submit(parse_taskfile(b"shell:0:0:1:true other\n").tasks)
    cli("submit", str(f), check=True)
    lines = cli("export", "--format", "jsonl", check=True).stdout.decode().splitlines()
    assert len(lines) == 2500 and {json.loads(line)["id"] for line in lines} == ids
    todo = cli("export", "--state", "todo", check=True).stdout.decode().splitlines()
    assert len(todo) == 2501
    assert [r.split(",")[6] for r in todo[1:4]] == ["true 0", "true 1", "true 2"], \
        "a state's tasks come in its list's order: todo in claim order"


def test_export_errors_change_nothing(cli, tmp_path):
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    missing = cli("export", "-o", str(tmp_path / "no-such-dir" / "x.csv"))
    assert missing.returncode == 2 and missing.stderr.decode().count("\n") == 1
    assert "cannot write there: No such file or directory" in missing.stderr.decode()
    isdir = cli("export", "-o", str(tmp_path))
    assert isdir.returncode == 2 and "is a directory" in isdir.stderr.decode()
    out = tmp_path / "out" / "index.csv"
    out.parent.mkdir()
    out.write_text("the previous export\n")
    down = cli("export", "-o", str(out), env={"DISTCOMP_REDIS_URL":
                                              f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 1 and down.stderr.decode().startswith("distcomp: error: cannot")
    assert out.read_text() == "the previous export\n"
    assert [p.name for p in out.parent.iterdir()] == ["index.csv"], "no temporary file left"


@pytest.mark.parametrize("limit, message", [
    ("-1", "--limit must be a positive number of tasks, got -1"),
    ("0", "--limit must be a positive number of tasks, got 0"),
    ("100000000000000000000", ("--limit must be at most 1,000,000, got 100000000000000000000 "
                               "(to list more, use `distcomp export --state STATE`)")),
])
def test_status_refuses_a_limit_that_lists_nothing_or_too_much(cli, limit, message):
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    proc = cli("status", "--state", "todo", "--limit", limit)
    err = proc.stderr.decode()
    assert (proc.returncode, err) == (2, f"distcomp: error: {message}\n")


def test_export_writes_through_a_fifo_a_symlink_and_dash(cli, tmp_path):
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = cli("export", "-o", str(fifo))
    reader.join(10)
    assert proc.returncode == 0, proc.stderr.decode()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO must stay a FIFO"
    assert read and read[0].decode().splitlines()[0] == ",".join(EXPORT_COLUMNS)

    real = tmp_path / "real.csv"
    real.write_text("the previous export\n")
    link = tmp_path / "link.csv"
    link.symlink_to("real.csv")
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to("new.csv")
    for path in (link, dangling):
        cli("export", "-o", str(path), check=True)
        assert path.is_symlink(), "written through the link, not over it"
    assert real.read_text().splitlines()[0] == ",".join(EXPORT_COLUMNS)
    assert (tmp_path / "new.csv").read_text() == real.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    dash = cli("export", "-o", "-", check=True)
    assert dash.stdout.decode() == real.read_text(), "-o - is standard output, rows only"
    assert not (tmp_path / "-").exists()


def test_global_options_go_after_the_command_too(cli, redis_server):
    elsewhere = {"DISTCOMP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    assert cli("status", "--json", env=elsewhere).returncode == 1
    proc = cli("status", "--json", "--redis", redis_server.url, env=elsewhere)
    assert proc.returncode == 0 and json.loads(proc.stdout)["total"] == 0, proc.stderr.decode()


NO_PASSWORD = ("there is no --password option (a password on the command line is seen by every "
               "user of the machine): give --password-file FILE or set DISTCOMP_REDIS_PASSWORD")


@pytest.mark.parametrize("args, message", [
    (["status", "stray", "redis://:S3cr3tPW@127.0.0.1:6391"],
     "unrecognized arguments: stray redis://***@127.0.0.1:6391 (see `distcomp status --help`)"),
    (["status", "redis://:S3cr@t@127.0.0.1:6413/0"],
     "unrecognized arguments: redis://***@127.0.0.1:6413/0 (see `distcomp status --help`)"),
    (["status", "redis:/:S3cr3tPW@h", "redis//:S3cr3tPW@h:1"],
     "unrecognized arguments: redis:/***@h ***@h:1 (see `distcomp status --help`)"),
    (["status", "--password", "S3cr3tPW"], NO_PASSWORD + " (see `distcomp status --help`)"),
    (["--password=S3cr3tPW", "status"], NO_PASSWORD + " (see `distcomp --help`)"),
    (["status", "--password-f", "pw.txt"],
     "unrecognized arguments: --password-f pw.txt (see `distcomp status --help`)"),
    (["submit", "--skip", "-"], "unrecognized arguments: --skip (see `distcomp submit --help`)"),
    (["inventory", "cloudlab", "m.xml", "--man", "node1"],
     "unrecognized arguments: --man node1 (see `distcomp inventory cloudlab --help`)"),
    (["inventory", "cloudlab", "m.xml", "--redis", "redis://me:S3cr3tPW@h:6391/0"],
     "unrecognized arguments: --redis redis://***@h:6391/0 (see `distcomp inventory cloudlab --help`)"),
    (["status", "--limit", "x"],
     "argument --limit: invalid int value: 'x' (see `distcomp status --help`)"),
    ([], "the following arguments are required: COMMAND (see `distcomp --help`)"),
])
def test_usage_errors_are_one_line_without_the_password(cli, args, message):
    """The hint names the help of the command that refused the argument, which lists what it
    takes (the top one lists only the commands)."""
    proc = cli(*args)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 2 and out == f"distcomp: error: {message}\n", out


@pytest.mark.parametrize("line, reason", [
    ("shell:²:1:1:echo x", "priority must be an integer, got '²'"),
    ('{"type": "shell", "params": "x", "priority": ' + "9" * 5000 + "}",
     "invalid JSON: a number has too many digits"),
    ('{"type": "shell", "params": "x", "env": ' + "[" * 30000 + "]" * 30000 + "}",
     "invalid JSON: arrays or objects nested too deeply"),
    ("shell:1:1:1:echo a\rshell:1:1:1:echo b\r", "line contains a carriage return (CR)"),
])
def test_lines_that_crashed_the_parser_are_line_errors(cli, tmp_path, client, namespace, line,
                                                       reason):
    f = tmp_path / "tasks.txt"
    f.write_bytes(line.encode() + b"\n")
    proc = cli("submit", str(f))
    err = proc.stderr.decode().splitlines()
    assert proc.returncode == 2 and err[0].startswith(f"{f}:1: {reason}") and len(err) == 2, err
    assert keys_of(client, namespace) == []


def test_a_lone_surrogate_late_in_a_file_queues_nothing(cli, tmp_path, client, namespace):
    """It used to pass parsing and fail hashing its id, after the chunks before it were
    stored: a traceback and a partly queued file."""
    f = tmp_path / "tasks.jsonl"
    good = b"".join(b'{"type":"shell","params":"echo %d"}\n' % i for i in range(2500))
    f.write_bytes(good + b'{"type":"shell","params":"echo \\ud800"}\n')
    proc = cli("submit", str(f))
    err = proc.stderr.decode().splitlines()
    assert proc.returncode == 2 and len(err) == 2, err
    assert err[0] == (f"{f}:2501: params holds \\ud800, a lone UTF-16 surrogate that is not a "
                      f"character (write the character itself, or its pair of surrogates)")
    assert keys_of(client, namespace) == []


def test_a_binary_file_lists_only_the_first_errors(cli, tmp_path, client, namespace):
    f = tmp_path / "lib.so"
    f.write_bytes(b"\x7fELF\x02\x01\x00\n" * 5000)
    proc = cli("submit", str(f))
    err = proc.stderr.decode().splitlines()
    assert proc.returncode == 2 and len(err) == 22, err[:3]
    assert err[19].startswith(f"{f}:20: line contains a NUL byte")
    assert err[20] == f"{f}: ... and 4980 more invalid line(s)"
    assert err[21].startswith(f"distcomp: error: {f}: 5000 invalid line(s); nothing was")
    assert keys_of(client, namespace) == []


def _env(redis_url: str, namespace: str, tmp_path) -> dict[str, str]:
    """The ``cli`` fixture's environment, for runs it cannot make (signals, closed stdin)."""
    (tmp_path / "none.conf").touch()
    return {**os.environ, "DISTCOMP_REDIS_URL": redis_url, "DISTCOMP_NAMESPACE": namespace,
            "DISTCOMP_CONFIG": str(tmp_path / "none.conf")}


def test_submit_with_standard_input_closed(redis_server, namespace, tmp_path):
    proc = subprocess.run(["sh", "-c", 'exec "$0" -m distcomp submit - <&-', sys.executable],
                          capture_output=True, env=_env(redis_server.url, namespace, tmp_path),
                          timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.decode() == (
        "distcomp: error: standard input is closed: give a taskfile, or pipe one in\n")


def test_ctrl_c_during_submit_says_what_was_queued_and_a_rerun_queues_the_rest(
        cli, redis_server, namespace, queue, tmp_path):
    n = 400_000
    f = tmp_path / "big.txt"
    f.write_text("".join(f"shell:0:0:1:true {i}\n" for i in range(n)))
    proc = subprocess.Popen([sys.executable, "-m", "distcomp", "submit", str(f)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(redis_server.url, namespace, tmp_path))
    try:
        wait_for(lambda: queue.counts()["todo"] or proc.poll() is not None, 60,
                 "submit to start queueing", interval=0.005)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    queued = queue.counts()["todo"]
    assert proc.returncode == 130 and 0 < queued < n, (proc.returncode, queued, err)
    assert err.decode() == (
        f"distcomp: error: interrupted: {queued} new task(s) of the {n} in {f} were queued "
        f"before it stopped; submitting the same file again queues only the rest (tasks "
        f"already queued are skipped)\n")
    again = cli("submit", "--json", str(f), check=True)
    assert json.loads(again.stdout) == {"added": n - queued, "existing": queued, "duplicates": 0, "invalid": 0}


# What `wait` says once on stderr when tasks are queued and no worker is alive.
NO_WORKER = ("distcomp: note: no live worker; the queued tasks wait until one starts (`distcomp "
             "worker`, or the distcomp-worker service)\n")


def test_ctrl_c_during_wait_is_one_line(cli, redis_server, namespace, client, queue, tmp_path):
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    proc = subprocess.Popen([sys.executable, "-m", "distcomp", "wait"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(redis_server.url, namespace, tmp_path))
    try:
        wait_for(lambda: client.pubsub_numsub(queue.key("drained"))[0][1], 30,
                 "wait to subscribe")
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode() == NO_WORKER + "distcomp: error: interrupted\n"


def test_ctrl_c_during_submit_wait_json_still_says_what_was_added(
        redis_server, namespace, client, queue, tmp_path):
    """The JSON of `submit --wait --json` came only after the wait: Ctrl-C lost how many tasks
    had been added, though they were queued."""
    taskfile = tmp_path / "tasks.txt"
    taskfile.write_text("shell:0:0:1:true\nshell:0:0:1:true 2\n")
    proc = subprocess.Popen([sys.executable, "-m", "distcomp", "submit", "--wait", "--json",
                             str(taskfile)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(redis_server.url, namespace, tmp_path))
    try:
        wait_for(lambda: client.pubsub_numsub(queue.key("drained"))[0][1], 30,
                 "the wait to subscribe")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode() == NO_WORKER + "distcomp: error: interrupted\n"
    doc = json.loads(out)
    assert (doc["added"], doc["interrupted"]) == (2, True), doc


def test_redis_refusing_part_way_says_what_was_queued(cli, tmp_path, namespace, own_redis):
    server = own_redis()
    Redis(server.url).execute("CONFIG", "SET", "maxmemory", "20mb")
    n = 100_000
    f = tmp_path / "big.txt"
    f.write_text("".join(f"shell:0:0:1:true {i}\n" for i in range(n)))
    proc = cli("submit", str(f), env={"DISTCOMP_REDIS_URL": server.url})
    queued = Queue(Redis(server.url), namespace).counts()["todo"]
    err = proc.stderr.decode()
    assert proc.returncode == 1 and 0 < queued < n and err.count("\n") == 1, err
    assert err.startswith(f"distcomp: error: Redis at {server.url} answered with an error: "
                          f"OOM command not allowed"), err
    assert err.endswith(f"; {queued} new task(s) of the {n} in {f} were queued before it "
                        f"stopped; submitting the same file again queues only the rest "
                        f"(tasks already queued are skipped)\n"), err


def test_ctrl_c_during_watch_exits_130(cli, redis_server, namespace, tmp_path):
    """As `wait` does: `distcomp watch && next-step` must not go on after the user stopped it."""
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    proc = subprocess.Popen([sys.executable, "-m", "distcomp", "watch", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(redis_server.url, namespace, tmp_path))
    try:
        assert proc.stdout.readline()  # its first progress line: it is watching
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode() == "distcomp: error: interrupted\n", err


def test_watch_on_a_terminal_ends_its_line_when_the_queue_drains(cli, redis_server, namespace,
                                                                  tmp_path):
    """On a terminal `watch` redraws one line; when the queue drained it left the cursor at its
    end, and the shell's prompt (or `make demo`'s next table) was glued to the bar."""
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    cli("cancel", "--all", check=True)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "distcomp", "watch"], stdout=follower,
                              stderr=subprocess.PIPE, timeout=60, check=False,
                              env=_env(redis_server.url, namespace, tmp_path))
        assert proc.returncode == 0, proc.stderr
        out = os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert out.startswith("\r[") and out.endswith("\033[K\r\n"), repr(out)


def _limited(size: int):
    """For subprocess: files this process writes may not grow past ``size`` bytes."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_output_that_cannot_be_written_is_one_line_and_keeps_the_old_file(
        cli, redis_server, namespace, tmp_path):
    """A full disk or a file size limit gave a traceback; an export must also keep the file it
    was replacing."""
    cli("submit", "-", input=b"".join(b"shell:0:0:1:true %d\n" % i for i in range(500)),
        check=True)
    out = tmp_path / "index.csv"
    out.write_text("the previous export\n")
    env = _env(redis_server.url, namespace, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "distcomp", "export", "-o", str(out)], env=env,
                          capture_output=True, timeout=60, preexec_fn=_limited(4096), check=False)
    assert proc.returncode == 1 and proc.stderr.decode() == (
        f"distcomp: error: {out}: cannot write: File too large; the file was left as it was\n")
    assert out.read_text() == "the previous export\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".index")] == []
    for argv in (["export"], ["status"], ["export", "-o", "/dev/full"]):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "distcomp", *argv], env=env,
                                  stdout=full, stderr=subprocess.PIPE, timeout=60, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.count("\n") == 1, (argv, err)
        assert err.startswith("distcomp: error: ") and "No space left on device" in err, err


def test_an_empty_output_name_is_refused_before_anything_is_read(cli):
    proc = cli("export", "-o", "")
    assert proc.returncode == 2 and proc.stderr.decode() == (
        "distcomp: error: -o: the file name is empty\n")


@pytest.mark.parametrize("argv", [
    ["--passwd=S3cr3t-x", "status"], ["--passwd", "S3cr3t-x", "status"],
    ["status", "--redis-password", "S3cr3t-x"], ["status", "--pw=S3cr3t-x"],
    ["--auth", "S3cr3t-x", "status"],
])
def test_a_password_option_that_does_not_exist_never_shows_the_password(cli, argv):
    proc = cli(*argv)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert "S3cr3t-x" not in err and err.startswith("distcomp: error: "), err


def test_a_taskfile_name_that_is_not_utf8_prints_escaped(cli, tmp_path):
    """Under a strict UTF-8 locale (en_US.UTF-8; forced here) the line after the submit was a
    traceback, though the tasks were queued."""
    name = os.fsencode(tmp_path) + b"/t\xff.txt"
    with open(name, "wb") as f:
        f.write(b"shell:0:0:1:true\n")
    proc = cli("submit", os.fsdecode(name), env={"PYTHONIOENCODING": "utf-8:strict"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(b"/t\\udcff.txt: added 1 task(s), 0 already queued\n"), proc.stdout


def test_wait_and_watch_say_when_queued_tasks_fit_no_live_worker(cli, queue, redis_server,
                                                                  namespace, tmp_path):
    """A task asking for more cores than any worker has stays todo for ever: `status` said so,
    `wait` and `watch` showed only the todo count."""
    cli("submit", "-", input=b"shell:0:0:64:true big\nshell:0:0:1:true small\n", check=True)
    assert queue.register("w", "tok", 3_600_000, {"host": "h", "room_mb": 1024, "cores": 2})[0]
    waited = cli("wait", "--timeout", "0.2")
    assert waited.returncode == 1 and waited.stderr.decode() == (
        "distcomp: error: timed out after 0.2s with 2 todo and 0 running; 1 of the todo need "
        "more memory or cores than any live worker offers\n")
    proc = subprocess.Popen([sys.executable, "-m", "distcomp", "watch", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(redis_server.url, namespace, tmp_path))
    try:
        line = proc.stdout.readline().decode()
    finally:
        proc.kill()
        proc.communicate()
    assert line.rstrip().endswith("workers 1  (1 need a bigger worker)"), line


def test_wait_says_once_that_no_worker_is_alive(cli):
    """With no live worker `wait` blocked in silence until its timeout or Ctrl-C, which the
    user could not tell from slow work."""
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    waited = cli("wait", "--timeout", "1", "--interval", "0.1")
    assert waited.returncode == 1
    assert waited.stderr.decode() == NO_WORKER + (
        "distcomp: error: timed out after 1s with 1 todo and 0 running; no worker is alive to "
        "take the todo\n")


def test_status_and_wait_tell_a_lost_workers_tasks_from_a_live_ones(cli, queue, client):
    """The only worker died: with no worker left to be heard from, its lease is kept (a dead
    worker and one cut off from Redis look alike) and its task waits. status counted it as
    alive, `workers` as lost, and wait ran into its timeout without a word why."""
    cli("submit", "-", input=b"shell:0:0:1:sleep 1000\n", check=True)
    assert queue.register("solo", "tok", 3000, {"host": "h", "room_mb": 1024, "cores": 2})[0]
    assert len(queue.claim("solo", "tok", 1024, 2, 1)) == 1
    assert queue.reap("/results", "h").requeued == 0  # its last reap: the cluster was heard
    wait_for(lambda: not client.exists(queue.key("lease", "solo")), 30, "its lease to expire")
    doc = json.loads(cli("status", "--json", check=True).stdout)
    assert (doc["running"], doc["workers_alive"], doc["stranded"]) == (1, 0, 1), doc
    human = cli("status", check=True).stdout.decode()
    assert "workers alive 0" in human and "note: 1 running task(s) belong to workers no " \
        "longer heard from" in human, human
    waited = cli("wait", "--timeout", "0.2")
    assert waited.returncode == 1 and waited.stderr.decode().endswith(
        "with 0 todo and 1 running; 1 of the running belong to workers no longer heard from, "
        "and go back to the queue once a live worker is\n"), waited.stderr


def test_requeue_of_a_worker_nobody_knows_is_refused(cli, queue):
    """A mistyped name said '0 task(s) of nosuch back in the queue', exit 0: the user took the
    requeue for done while the real worker's tasks stayed where they were."""
    assert queue.register("w1", "tok", 60_000, {"host": "h", "room_mb": 1024})[0]
    proc = cli("requeue", "--worker", "nosuch")
    assert proc.returncode == 2 and proc.stderr.decode() == (
        f"distcomp: error: no worker named 'nosuch' in namespace {queue.ns!r} (see `distcomp "
        f"workers`)\n")
    known = cli("requeue", "--worker", "w1", check=True)
    assert known.stdout.decode() == "0 task(s) of w1 back in the queue\n"


def test_requeue_of_an_empty_worker_name_is_refused(cli):
    """`requeue --worker "$W"` with W unset said '0 task(s) of  back in the queue', exit 0."""
    proc = cli("requeue", "--worker", "")
    assert proc.returncode == 2 and proc.stderr.decode() == (
        "distcomp: error: --worker is empty: give a worker's name (see `distcomp workers`)\n")
