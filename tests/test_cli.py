"""The distcomp command as people and playbooks use it: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import RedisServer
from tests.helpers import free_port


def keys_of(client, namespace):
    return sorted(client.scan_iter(match=f"{namespace}:*"))


def test_submit_json_and_idempotent_resubmission(cli, tmp_path):
    f = tmp_path / "tasks.txt"
    f.write_text("# sweep\nshell:4:2:2:./cachesim --trace /mnt/mfs/t1.bin --size 0.1:0.5\n"
                 "python:1:0.5:1:sim.py --seed 3\n\n")
    first = cli("submit", "--json", str(f), check=True)
    assert json.loads(first.stdout) == {"added": 2, "existing": 0, "invalid": 0}
    second = cli("submit", "--json", str(f), check=True)
    assert json.loads(second.stdout) == {"added": 0, "existing": 2, "invalid": 0}
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
    assert json.loads(proc.stdout) == {"added": 2, "existing": 0, "invalid": 1}
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


def test_cancel_and_retry_from_the_cli(cli):
    cli("submit", "-", input=b"shell:0:0:1:echo a\nshell:0:0:1:echo b\n", check=True)
    out = json.loads(cli("cancel", "--all", "--json", check=True).stdout)
    assert out == {"cancelled": 2, "queued": 2, "running": 0}
    assert json.loads(cli("status", "--json").stdout)["failed"] == 2
    assert json.loads(cli("retry", "--all", "--json", check=True).stdout) == {"retried": 2}
    assert json.loads(cli("status", "--json").stdout)["todo"] == 2
    usage = cli("retry")
    assert usage.returncode == 2 and b"give task ids, or --all" in usage.stderr


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


@pytest.mark.parametrize("args, message", [
    (["wait", "--interval", "-1"], "--interval must be a positive number of seconds, got -1"),
    (["wait", "--interval", "0"], "--interval must be a positive number of seconds, got 0"),
    (["wait", "--timeout", "-5"], "--timeout must be 0 (none) or a positive number of seconds"),
    (["watch", "--interval", "-0.5"], "--interval must be a positive number of seconds"),
])
def test_bad_intervals_are_one_line_errors(cli, args, message):
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)  # something to wait for
    proc = cli(*args)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [
    (["--wait", "--interval", "0"], "--interval must be a positive number of seconds, got 0"),
    (["--wait", "--timeout", "-1"], "--timeout must be 0 (none) or a positive number of seconds"),
    (["--timeout", "60"], "--timeout and --interval only apply with --wait"),
    (["--interval", "2"], "--timeout and --interval only apply with --wait"),
])
def test_bad_submit_wait_options_submit_nothing(cli, queue, args, message):
    proc = cli("submit", "-", *args, input=b"shell:0:0:1:true\n")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert queue.counts()["todo"] == 0
