"""Configuration mistakes through the real ``distcomp`` command: one line, exit 2, no password."""

from __future__ import annotations

import socket
import time

import pytest

from distcomp.config import Config
from tests.conftest import RedisServer
from tests.helpers import free_port


def one_line_error(proc, code: int = 2) -> str:
    """The error a person sees, checked to be the single line the project promises."""
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert err.startswith("distcomp: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("url", [
    "redis://:Sec/ret99@127.0.0.1:{port}",
    "redis://:Sec#ret99@127.0.0.1:{port}",
    "redis://:Sec?ret99=1@127.0.0.1:{port}",
    "redis://alice:Sec/ret99@127.0.0.1:{port}/0",
])
def test_a_password_with_a_slash_hash_or_question_mark_is_never_shown(cli, url):
    proc = cli("--redis", url.format(port=free_port()), "status")
    err = one_line_error(proc)
    assert "Sec" not in err and "ret99" not in err and "alice" not in err
    assert "write '/', '?' and '#' in the password as %2F, %3F and %23" in err


@pytest.mark.parametrize("url, shown", [
    ("redis://:p/w@h:1/0", "redis://:***@h:1/0"),
    ("redis://al:p@ss@h:1/0", "redis://***@h:1/0"),
    ("redis://S3cr3tPW@h:1", "redis://***@h:1"),
    ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
])
def test_the_redacted_url_masks_the_whole_user_info(url, shown):
    assert Config(url=url).redacted_url() == shown


def test_a_password_written_without_its_colon_is_masked_and_explained(cli):
    proc = cli("--redis", f"redis://S3cr3tPW@127.0.0.1:{free_port()}", "status")
    err = one_line_error(proc)
    assert "S3cr3tPW" not in err
    assert "gives a user but no password (did you mean redis://:PASSWORD@HOST?)" in err


def test_a_user_in_the_url_with_the_password_given_apart_still_works(cli, tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("acl"), password="s3cret-pw")
    server.start()
    try:
        url = f"redis://default@127.0.0.1:{server.port}/0"
        ok = cli("--redis", url, "status", env={"DISTCOMP_REDIS_PASSWORD": "s3cret-pw"})
        assert ok.returncode == 0, ok.stderr
        wrong = cli("--redis", url, "status", env={"DISTCOMP_REDIS_PASSWORD": "nope"})
        err = one_line_error(wrong, 1)
        assert f"Redis at redis://***@127.0.0.1:{server.port}/0 refused the password" in err
    finally:
        server.stop()


@pytest.mark.parametrize("url, message", [
    ("redis://redis..local:6379/0", "host name 'redis..local' is not valid"),
    ("redis://:pw-xyz@[::1", "Redis URL 'redis://:***@[::1': Invalid IPv6 URL"),
    ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem",
     "ssl_ca_certs /nonexistent/ca.pem: cannot read: No such file or directory"),
    ("rediss://127.0.0.1:6379/0?ssl_ca_certs={notpem}", "no PEM certificate in it"),
])
def test_urls_that_cannot_work_are_one_line_config_errors(cli, tmp_path, url, message):
    notpem = tmp_path / "not.pem"
    notpem.write_text("not a certificate\n")
    err = one_line_error(cli("--redis", url.format(notpem=notpem), "status"))
    assert message in err and "pw-xyz" not in err


def test_text_that_is_not_utf8_is_named(cli, tmp_path):
    pw = tmp_path / "pw"
    pw.write_bytes(b"p\xffw\n")
    err = one_line_error(cli("--password-file", str(pw), "status"))
    assert f"password file {pw} is not UTF-8 text" in err
    conf = tmp_path / "latin1.conf"
    conf.write_bytes(b"[redis]\npassword = p\xffw\n")
    err = one_line_error(cli("--config", str(conf), "status"))
    assert f"config file {conf} is not UTF-8 text" in err
    err = one_line_error(cli("status", env={"DISTCOMP_REDIS_PASSWORD": b"p\xffw"}))
    assert "DISTCOMP_REDIS_PASSWORD is not UTF-8 text" in err


def test_an_empty_distcomp_config_means_unset(cli):
    proc = cli("status", "--json", env={"DISTCOMP_CONFIG": ""})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("text, message", [
    ("[redis]\npasword = hunter2\n", "unknown key 'pasword' in [redis]"),
    ("[Redis]\npassword = hunter2\n", "unknown section [Redis] (expected [redis] and [worker])"),
])
def test_unknown_redis_keys_and_sections_are_refused(cli, tmp_path, text, message):
    conf = tmp_path / "typo.conf"
    conf.write_text(text)
    err = one_line_error(cli("--config", str(conf), "status"))
    assert message in err and "hunter2" not in err


def test_an_ini_error_names_the_line_but_does_not_quote_it(cli, tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[redis]\nurl = redis://127.0.0.1:6379/0\nhunter2-pasted-alone\n")
    err = one_line_error(cli("--config", str(conf), "status"))
    assert f"config file {conf} is not valid INI: line 3 is not" in err
    assert "hunter2" not in err
    conf.write_text("password = hunter2\n[redis]\n")
    err = one_line_error(cli("--config", str(conf), "status"))
    assert "line 1 comes before any [section]" in err and "hunter2" not in err


def test_an_empty_password_file_is_named(cli, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("\n")
    err = one_line_error(cli("--password-file", str(pw), "status"))
    assert f"password file {pw} is empty" in err


def test_a_listener_that_never_answers_is_given_up_on_in_seconds(cli):
    """The CLI waits its connect timeout (5 s) for the first reply, not the 30 s a long
    command may take, on each of its tries."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)
    try:
        started = time.monotonic()
        proc = cli("status", env={
            "DISTCOMP_REDIS_URL": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"})
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert "timed out" in one_line_error(proc, 1)
    assert elapsed < 30
