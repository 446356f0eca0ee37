"""Bad input never changes Redis: each case asserts the exact message, the exit code and that
every key (DUMP of each) is the same before and after."""

from __future__ import annotations

import json

import pytest
from faultharness import free_port

BAD_INPUT = 2
OPERATIONAL = 1
NOTHING = ("distcomp: error: {f}: {n} invalid line(s); nothing was submitted (fix them, or use "
           "--skip-invalid to submit the valid lines)\n")

NO_TASKS = ("distcomp: error: {f}: no tasks in file (only blank lines, comments or invalid "
            "lines)\n")

FOREIGN = {
    "other:string": ("set", "hello"),
    "other:hash": ("hset", {"a": "1", "b": "2"}),
    "distcompx:t:0123456789abcdef": ("hset", {"state": "todo"}),
    "distcomp": ("set", "a key named like the namespace, but not in it"),
    "Distcomp:counts": ("hset", {"todo": "7"}),
    "queue:list": ("rpush", ["x", "y"]),
}


def snapshot(client) -> dict[bytes, bytes]:
    """Every key with its serialized value (and TTL presence), so any write shows."""
    return {k: (client.dump(k), client.pttl(k) > 0) for k in client.scan_iter(count=1000)}


def add_foreign(client) -> None:
    for key, (kind, value) in FOREIGN.items():
        if kind == "set":
            client.set(key, value)
        elif kind == "hset":
            client.hset(key, mapping=value)
        else:
            client.rpush(key, *value)


@pytest.fixture
def seeded(redis_server, cluster_factory):
    """A namespace with two queued tasks next to keys that are not ours."""
    c = cluster_factory(redis_server)
    add_foreign(c.r)
    c.submit_lines(["shell:0:0:0:echo one", "shell:0:0:0:echo two"])
    return c


def submit_bytes(c, tmp_path, name: str, data: bytes, *extra: str):
    path = tmp_path / name
    path.write_bytes(data)
    return c.cli("submit", str(path), *extra), str(path)


CASES = [
    ("empty", b"", NO_TASKS),
    ("comments-only", b"# nothing\n\n   \n", NO_TASKS),
    ("binary", b"\x7fELF\x02\x01\x01\x00\x00\nabc\xff\n",
     ("{f}:1: line contains a NUL byte (is this a binary file?)\n"
      "{f}:2: not valid UTF-8 (byte 0xff at column 4)\n") + NOTHING.replace("{n}", "2")),
    ("utf8", b"shell:0:0:0:echo \xff\xfe\n",
     "{f}:1: not valid UTF-8 (byte 0xff at column 18)\n" + NOTHING.replace("{n}", "1")),
    ("megabyte-line", b"shell:0:0:0:echo " + b"x" * (1 << 20) + b"\n",
     "{f}:1: line is 1048593 bytes, longer than the 65536 byte limit\n"
     + NOTHING.replace("{n}", "1")),
    ("fields",
     (b"shell:0:0:0:\nshell:1:2:3:   \nperl:0:0:0:x\nshell:0:-1:0:x\nshell:0:nan:0:x\n"
     b"shell:0:1e300:0:x\nshell:0:0:inf:x\nshell:0:0:-2:x\nshell:99999999999999999999:0:0:x\n"
     b"shell:1.5:0:0:x\nshell:0:0:0\n"),
     ("{f}:1: params is empty: nothing to run\n"
     "{f}:2: params is empty: nothing to run\n"
     "{f}:3: unknown task type 'perl' (expected one of: shell, python)\n"
     "{f}:4: min_dram_gb must be >= 0, got -1.0\n"
     "{f}:5: min_dram_gb must be a finite number, got 'nan'\n"
     "{f}:6: min_dram_gb 1e+300 is larger than any node (1,048,576 at most)\n"
     "{f}:7: min_cpu must be a finite number, got 'inf'\n"
     "{f}:8: min_cpu must be >= 0, got -2.0\n"
     "{f}:9: priority 99999999999999999999 is out of range (-999999..999999)\n"
     "{f}:10: priority must be an integer, got '1.5'\n"
     "{f}:11: expected type:priority:min_dram_gb:min_cpu:params, found 4 field(s)\n")
     + NOTHING.replace("{n}", "11")),
    ("json",
     (b'{"type":"shell","params":5}\n'
     b'{"type":"shell","params":"x","priority":"high"}\n'
     b'{"type":"shell","params":"x","priority":1000000}\n'
     b'{"type":"shell","params":"x","min_cpu":true}\n'
     b'{"type":"shell","params":"x","env":{"A":1}}\n'
     b'{"type":"shell","params":"x","timeout_s":-1}\n'
     b'{"type":"shell","params":"x","max_retries":1.5}\n'
     b'{"type":"shell","params":"x","colour":"red"}\n'
     b'{"type":"shell"\n'
     b'["shell","x"]\n'),
     ("{f}:1: params must be a string, got int\n"
     "{f}:2: priority must be an integer, got 'high'\n"
     "{f}:3: priority 1000000 is out of range (-999999..999999)\n"
     "{f}:4: min_cpu must be a number, got True\n"
     "{f}:5: env must be an object mapping variable names to strings\n"
     "{f}:6: timeout_s must be >= 0, got -1\n"
     "{f}:7: max_retries must be an integer from 0 to 1000\n"
     "{f}:8: unknown field(s): 'colour'\n"
     "{f}:9: invalid JSON: Expecting ',' delimiter at column 16\n"
     "{f}:10: a JSON task must be an object\n")
     + NOTHING.replace("{n}", "10")),
    ("one-bad-among-good", b"shell:0:0:0:echo a\nshell:0:0:0:echo b\nshell:x:0:0:echo c\n",
     "{f}:3: priority must be an integer, got 'x'\n" + NOTHING.replace("{n}", "1")),
]


@pytest.mark.parametrize("name,data,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_taskfile_changes_nothing(seeded, tmp_path, name, data, expected):
    before = snapshot(seeded.r)
    out, path = submit_bytes(seeded, tmp_path, name, data)
    assert out.stderr.decode() == expected.replace("{f}", path)
    assert out.stdout == b""
    assert out.returncode == BAD_INPUT
    assert snapshot(seeded.r) == before


def test_missing_file_and_directory(seeded, tmp_path):
    before = snapshot(seeded.r)
    missing = tmp_path / "nope.txt"
    out = seeded.cli("submit", str(missing))
    assert (out.returncode, out.stderr.decode()) == (
        BAD_INPUT, f"distcomp: error: {missing}: no such file\n")
    out = seeded.cli("submit", str(tmp_path))
    assert (out.returncode, out.stderr.decode()) == (
        BAD_INPUT, f"distcomp: error: {tmp_path}: is a directory, expected a taskfile\n")
    assert snapshot(seeded.r) == before


def test_duplicate_lines_are_accepted_once(seeded, tmp_path):
    out, _ = submit_bytes(seeded, tmp_path, "dups",
                          b"shell:0:0:0:echo dup\nshell:0:0:0:echo dup\nshell:0:0.0:0:echo dup\n"
                          b'{"type":"shell","params":"echo dup","min_cpu":0}\n'
                          b"shell:0:0:0:echo one\n", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"added": 1, "existing": 4, "duplicates": 3,
                                       "invalid": 0}
    assert seeded.r.hget("distcomp:counts", "todo") == b"3"


def test_windows_line_endings_are_accepted(seeded, tmp_path):
    out, _ = submit_bytes(seeded, tmp_path, "crlf",
                          b"shell:0:0:0:echo a\r\nshell:0:0:0:echo b\r\n\r\n", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"added": 2, "existing": 0, "duplicates": 0, "invalid": 0}
    params = {seeded.r.hget(k, "params") for k in seeded.r.scan_iter(match="distcomp:t:*")}
    assert params == {b"echo one", b"echo two", b"echo a", b"echo b"}


def test_wrong_or_missing_password(redis_factory, cluster_factory, tmp_path):
    server = redis_factory(password="s3cret")
    c = cluster_factory(server)
    add_foreign(c.r)
    before = snapshot(c.r)
    task = tmp_path / "t"
    task.write_text("shell:0:0:0:echo hi\n")
    wrong = f"redis://:wrong@127.0.0.1:{server.port}/0"
    out = c.cli("submit", str(task), url=wrong)
    assert (out.returncode, out.stderr.decode()) == (OPERATIONAL, (
        f"distcomp: error: Redis at redis://:***@127.0.0.1:{server.port}/0 refused the password "
        f"(check DISTCOMP_REDIS_PASSWORD, --password-file or the config file)\n"))
    none = f"redis://127.0.0.1:{server.port}/0"
    out = c.cli("submit", str(task), url=none)
    assert (out.returncode, out.stderr.decode()) == (OPERATIONAL, (
        f"distcomp: error: Redis at {none} requires a password: set DISTCOMP_REDIS_PASSWORD, "
        f"--password-file or [redis] password_file\n"))
    out = c.cli("worker", "--name", "w", "--results-dir", str(tmp_path / "r"), url=wrong)
    assert out.returncode == OPERATIONAL
    assert "refused the password" in out.stderr.decode()
    assert snapshot(c.r) == before
    good = f"redis://:s3cret@127.0.0.1:{server.port}/0"
    out = c.cli("submit", str(task), "--json", url=good)
    assert out.returncode == 0, out.stderr


def test_redis_unreachable(cluster_factory, redis_server, tmp_path):
    c = cluster_factory(redis_server)
    task = tmp_path / "t"
    task.write_text("shell:0:0:0:echo hi\n")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    for args in (("submit", str(task)), ("status",), ("wait", "--timeout", "1"),
                 ("worker", "--name", "w", "--results-dir", str(tmp_path / "r"))):
        out = c.cli(*args, url=url)
        assert (out.returncode, out.stderr.decode()) == (OPERATIONAL, (
            f"distcomp: error: cannot reach Redis at {url}: connecting to "
            f"127.0.0.1:{port} failed: Connection refused\n")), args


def test_foreign_keys_survive_submit_worker_and_purge(redis_server, cluster_factory, tmp_path):
    c = cluster_factory(redis_server)
    add_foreign(c.r)
    foreign = snapshot(c.r)
    c.submit_lines([f"shell:0:0:0:echo {i}" for i in range(20)])
    c.worker("w0", extra=["--exit-when-empty"])
    assert c.workers[0].proc.wait(timeout=120) == 0
    assert c.r.hget("distcomp:counts", "finished") == b"20"
    assert {k: v for k, v in snapshot(c.r).items() if k in foreign} == foreign
    out = c.cli("purge", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["deleted_keys"] > 20
    assert snapshot(c.r) == foreign
