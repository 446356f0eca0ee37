"""Configuration mistakes through the real ``distcomp`` command: one line, exit 2, no password."""

from __future__ import annotations

import json
import socket

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
    proc = cli("status", env={"DISTCOMP_REDIS_URL": url.format(port=free_port())})
    err = one_line_error(proc)
    assert "Sec" not in err and "ret99" not in err and "alice" not in err
    assert "write '/', '?' and '#' in the password as %2F, %3F and %23" in err


@pytest.mark.parametrize("url, shown", [
    ("redis://:p/w@h:1/0", "redis://:***@h:1/0"),
    ("redis://al:p@ss@h:1/0", "redis://***@h:1/0"),
    ("redis://S3cr3tPW@h:1", "redis://***@h:1"),
    ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
    # nothing before the last '@' shows, whatever comes before it
    ("redis:/:p@ss@h:1", "***@h:1"),
    ("x//:pw://y@h", "***@h"),
    ("REDIS://:pw@h", "REDIS://:***@h"),
    ("redis://@h", "redis://***@h"),
    # without its '@', a password is where the port goes: all after the host is masked
    ("redis://:S3cr3tPW", "redis://:***"),
    ("redis://default:S3c/r3t?x", "redis://default:***"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://[::1]:6379", "redis://[::1]:6379"),
    ("redis://[::1]", "redis://[::1]"),
])
def test_the_redacted_url_masks_the_whole_user_info(url, shown):
    assert Config(url=url).redacted_url() == shown


@pytest.mark.parametrize("url", ["redis://:S3cr3tPW", "redis://default:S3cr3tPW/0",
                                 "redis://:S3cr\uff0fetPW@127.0.0.1:6379"])
def test_a_password_without_its_at_or_with_characters_nfkc_changes_is_never_shown(
        cli, tmp_path, url):
    """urllib's messages quote the port, or the whole host part: where a password sits when
    its '@' is left out, and all of it when it holds a character such as a fullwidth '/'."""
    err = one_line_error(cli("status", env={"DISTCOMP_REDIS_URL": url}))
    assert "S3cr" not in err and "etPW" not in err, err
    assert "not a port" in err or "NFKC" in err, err
    conf = tmp_path / "node.conf"
    conf.write_text(f"[redis]\nurl = {url}\n")
    err = one_line_error(cli("--config", str(conf), "status", env={"DISTCOMP_REDIS_URL": None}))
    assert "S3cr" not in err and "etPW" not in err, err


def test_a_password_in_the_redis_option_is_refused_unshown(cli, redis_server):
    """`ps` shows every process's arguments to every user of the machine; the CLI already
    refused --password for that reason, while --redis redis://:PASSWORD@HOST was documented."""
    url = redis_server.url.replace("redis://", "redis://:S3cr3tPW@")
    err = one_line_error(cli("--redis", url, "submit", "-", input=b"shell:0:0:0:true\n"))
    assert "--redis holds a password" in err and "DISTCOMP_REDIS_URL" in err, err
    assert "S3cr3tPW" not in err
    status = json.loads(cli("status", "--json", check=True).stdout)
    assert status["total"] == 0


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
    err = one_line_error(cli("status", env={"DISTCOMP_REDIS_URL": url.format(notpem=notpem)}))
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
    # Every section inherits [DEFAULT]'s keys: its url was ignored without a word.
    ("[DEFAULT]\nurl = redis://:hunter2@127.0.0.1:1/0\n",
     "unknown section [DEFAULT] (expected [redis] and [worker])"),
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
        proc = cli("status", env={
            "DISTCOMP_REDIS_URL": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"})
    finally:
        silent.close()
    assert "reading from Redis failed: no reply within 5s" in one_line_error(proc, 1)


@pytest.mark.parametrize("url, shown", [
    ("redis:/:TOPSECRET@h", "***@h"),
    ("redis//:TOPSECRET@h:1", "***@h:1"),
    ("redis//:TOPSECRET://x@h:1", "***@h:1"),
    ("http://:TOPSECRET@h:1/0", "http://:***@h:1/0"),
    ("127.0.0.1:6379", "127.0.0.1:6379"),
])
def test_a_url_without_a_redis_scheme_is_refused_without_the_password(cli, url, shown):
    """Without '://' nothing was masked: 'redis:/:PW@h' failed later in int()'s words, which
    quoted the password, and 'redis//:PW@h:1' was shown whole in the scheme error."""
    err = one_line_error(cli("status", env={"DISTCOMP_REDIS_URL": url}))
    assert err == (f"distcomp: error: Redis URL must start with redis://, rediss:// or unix://, "
                   f"got {shown!r}\n")


def test_a_scheme_in_capitals_still_works(cli, redis_server):
    proc = cli("--redis", redis_server.url.replace("redis://", "REDIS://"), "status", "--json")
    assert proc.returncode == 0, proc.stderr.decode()


def test_a_password_given_where_its_file_is_asked_for_is_not_shown(cli, tmp_path):
    err = one_line_error(cli("--password-file", "MyTopSecret", "status"))
    assert "MyTopSecret" not in err
    assert "password file not found (its name is not shown, in case it is the password" in err
    missing = tmp_path / "no-such-dir" / "redis.pass"
    err = one_line_error(cli("--password-file", str(missing), "status"))
    assert err == f"distcomp: error: cannot read password file {missing}: no such file\n"


@pytest.mark.parametrize("line", [
    "password = hunter2 ;tail",
    "password = hunter2   ; the Redis password",
    "password = hunter2 #tail",
    "password = ;hunter2",
])
def test_a_password_line_with_an_inline_comment_is_refused(cli, tmp_path, line):
    """It used to be cut at the comment: Redis then refused a password the user never wrote."""
    conf = tmp_path / "pw.conf"
    conf.write_text(f"[redis]\n{line}\n")
    err = one_line_error(cli("--config", str(conf), "status"))
    assert err == (f"distcomp: error: {conf}: [redis] password holds ' ;' or ' #', which start "
                   f"a comment in this file: put the password in a password_file, or remove "
                   f"the comment\n")
    assert "hunter2" not in err and "tail" not in err


def test_inline_comments_are_still_cut_everywhere_else(cli, tmp_path):
    """The password keeps ';' and '#' that no blank precedes; every other value loses its
    comment (a URL, namespace or integer with one would be refused), and so does a section
    header, even one whose comment holds brackets."""
    (tmp_path / "srv").mkdir()
    server = RedisServer(tmp_path / "srv", password="a;b#c")
    server.start()
    try:
        conf = tmp_path / "ok.conf"
        conf.write_text(f"[redis]   ; where [the queue] lives\n"
                        f"url = {server.url}   ; the manager\n"
                        f"password = a;b#c\n"
                        f"namespace = ns1 # mine\n"
                        f"[worker]\nmax_tasks = 3 ; at most\n")
        proc = cli("--config", str(conf), "status", "--json",
                   env={"DISTCOMP_REDIS_URL": None, "DISTCOMP_NAMESPACE": None})
        assert proc.returncode == 0, proc.stderr.decode()
    finally:
        server.stop()


@pytest.mark.parametrize("option", ["--namespace", "--redis", "--config", "--password-file"])
def test_an_option_given_empty_is_refused_not_taken_for_the_default(cli, option):
    """`--namespace "$EXP"` with EXP unset named the default namespace (here the test's own,
    from DISTCOMP_NAMESPACE), and `purge --yes` emptied that queue; `--config ""` read the
    default configuration (and its namespace) and `--password-file ""` was left out."""
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    err = one_line_error(cli(option, "", "purge", "--yes"))
    assert f"{option} is empty" in err
    assert b'"todo": 1' in cli("status", "--json", check=True).stdout


@pytest.mark.parametrize("variable", ["DISTCOMP_NAMESPACE", "DISTCOMP_REDIS_URL"])
def test_a_variable_set_empty_is_refused_not_taken_for_the_default(cli, variable):
    """`DISTCOMP_NAMESPACE="$EXP"` with EXP unset named the default namespace, and `purge
    --yes` emptied another experiment's queue, as an empty --namespace did."""
    cli("submit", "-", input=b"shell:0:0:1:true\n", check=True)
    err = one_line_error(cli("purge", "--yes", env={variable: ""}))
    assert f"{variable} is set but empty" in err
    assert b'"todo": 1' in cli("status", "--json", check=True).stdout


def test_the_configs_password_file_is_read_only_when_nothing_else_gives_one(
        cli, tmp_path, tmp_path_factory):
    """The URL, DISTCOMP_REDIS_PASSWORD and --password-file come before the config file, so a
    password_file there that this user cannot read must not stop them."""
    server = RedisServer(tmp_path_factory.mktemp("pwfile"), password="s3cret-pw")
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        conf = tmp_path / "node.conf"
        conf.write_text(f"[redis]\nurl = {url}\npassword_file = /nonexistent/redis.pass\n")
        given = tmp_path / "pw"
        given.write_text("s3cret-pw\n")
        for extra, env in ((["--password-file", str(given)], {}),
                           ([], {"DISTCOMP_REDIS_PASSWORD": "s3cret-pw"}),
                           ([], {"DISTCOMP_REDIS_URL":
                                 f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"})):
            ok = cli("--config", str(conf), *extra, "status",
                     env={"DISTCOMP_REDIS_URL": None, **env})
            assert ok.returncode == 0, (extra, ok.stderr)
        err = one_line_error(cli("--config", str(conf), "status",
                                 env={"DISTCOMP_REDIS_URL": None}))
        assert "cannot read password file /nonexistent/redis.pass: no such file" in err
    finally:
        server.stop()


def test_a_byte_order_mark_is_not_part_of_a_config_or_password_file(cli, tmp_path,
                                                                     tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("bom"), password="s3cret-pw")
    server.start()
    try:
        pw = tmp_path / "pw"
        pw.write_bytes(b"\xef\xbb\xbfs3cret-pw\r\n")
        conf = tmp_path / "bom.conf"
        conf.write_bytes(f"\ufeff[redis]\nurl = redis://127.0.0.1:{server.port}/0\n"
                         f"password_file = {pw}\n".encode())
        proc = cli("--config", str(conf), "status", "--json", env={"DISTCOMP_REDIS_URL": None})
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop()


def test_port_0_is_refused_not_taken_for_6379(cli):
    err = one_line_error(cli("--redis", "redis://127.0.0.1:0/0", "status"))
    assert "port 0 is not a port Redis listens on" in err


def test_a_name_holding_a_line_break_leaves_the_error_one_line(cli, tmp_path):
    """Errors are one line, and quote names as given: a file named with a newline broke the
    line in two, which a log reader takes for two messages."""
    err = one_line_error(cli("--config", str(tmp_path / "no\nsuch.conf"), "status"))
    assert "no\\nsuch.conf" in err
    err = one_line_error(cli("submit", str(tmp_path / "tasks\r\n.txt")))
    assert "tasks\\r\\n.txt" in err
    bad = tmp_path / "bad\ntasks.txt"
    bad.write_text("shell:x:0:1:echo\n")
    proc = cli("submit", str(bad))
    assert proc.returncode == 2
    name = f"{tmp_path}/bad\\ntasks.txt"
    summary = (f"distcomp: error: {name}: 1 invalid line(s); nothing was submitted (fix them, "
               "or use --skip-invalid to submit the valid lines)")
    assert proc.stderr.decode().splitlines() == [
        f"{name}:1: priority must be an integer, got 'x'", summary]
