"""distcomp's own Redis client against a real redis-server, checked through redis-py."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from distcomp.config import Config, ConfigError
from distcomp.redis_client import (
    AuthError,
    ConnectError,
    NoScriptError,
    Redis,
    ResponseError,
    pack,
)
from tests.conftest import RedisServer, _redis_binary
from tests.helpers import free_port, wait_for


@pytest.fixture
def r(redis_server: RedisServer) -> Redis:
    return Redis(redis_server.url)


def test_replies_of_every_kind_arrive_intact(r, client, namespace):
    blob = bytes(range(256)) * 4096 + b"\r\n$3\r\n"  # 1 MiB, binary, with protocol look-alikes
    client.set(f"{namespace}:blob", blob)
    assert r.execute("GET", f"{namespace}:blob") == blob
    assert r.execute("GET", f"{namespace}:missing") is None
    assert r.execute("INCRBY", f"{namespace}:n", 41) == 41
    assert r.ping() is True
    nested = r.execute("EVAL", "return {1, {'a', {}}, 'b', false}", 0)
    assert nested == [1, [b"a", []], b"b", None]
    r.set(f"{namespace}:text", "grüße 1.5")
    assert client.get(f"{namespace}:text") == "grüße 1.5".encode()


def test_numbers_go_out_as_python_writes_them_and_bools_are_refused():
    assert pack(("SET", "k", 1.5, 7, b"\x00")) == \
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n1.5\r\n$1\r\n7\r\n$1\r\n\x00\r\n"
    with pytest.raises(TypeError, match="cannot send bool"):
        pack(("SET", "k", True))


def test_error_replies_raise_or_come_back_in_their_place_in_a_pipeline(r, namespace):
    r.set(f"{namespace}:s", "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        r.execute("HGET", f"{namespace}:s", "f")
    pipe = r.pipeline()
    pipe.command("INCR", f"{namespace}:c")
    pipe.command("HGET", f"{namespace}:s", "f")
    pipe.hgetall(f"{namespace}:none")
    replies = pipe.execute(raise_on_error=False)
    assert replies[0] == 1 and isinstance(replies[1], ResponseError) and replies[2] == {}
    pipe.command("INCR", f"{namespace}:c")
    pipe.command("HGET", f"{namespace}:s", "f")
    with pytest.raises(ResponseError):
        pipe.execute()
    assert r.execute("GET", f"{namespace}:c") == b"2", "the commands before the error still ran"


def test_a_script_redis_lost_is_loaded_and_runs_once(r, client, namespace):
    counter = r.script("return redis.call('INCR', ARGV[1])")
    assert counter(f"{namespace}:runs") == 1
    client.script_flush()
    assert counter(f"{namespace}:runs") == 2
    client.script_flush()
    with pytest.raises(NoScriptError):
        r.execute("EVALSHA", counter.sha, 0, f"{namespace}:runs")
    assert client.get(f"{namespace}:runs") == b"2"


def test_a_broken_connection_is_replaced_and_the_command_sent_again(r, client, namespace,
                                                                  redis_server):
    r.set(f"{namespace}:k", "v")
    my_id = r.execute("CLIENT", "ID")
    client.client_kill_filter(_id=my_id)
    assert r.execute("GET", f"{namespace}:k") == b"v"
    assert r.execute("CLIENT", "ID") != my_id

    once = Redis(redis_server.url, retries=0)
    client.client_kill_filter(_id=once.execute("CLIENT", "ID"))
    with pytest.raises(ConnectError, match="closed the connection|failed"):
        once.execute("GET", f"{namespace}:k")


def test_an_unreachable_redis_is_a_connect_error_after_the_retries():
    port = free_port()
    with pytest.raises(ConnectError, match=f"connecting to 127.0.0.1:{port} failed: "
                                           "Connection refused"):
        Redis(f"redis://127.0.0.1:{port}/0", retries=2, backoff=0.0).ping()


def test_a_reply_that_does_not_come_in_time_is_a_connect_error(redis_server, namespace):
    slow = Redis(redis_server.url, timeout=0.2, retries=0)
    with pytest.raises(ConnectError, match="no reply within 0.2s"):
        slow.execute("BLPOP", f"{namespace}:never", 5)


def test_password_database_and_user_from_the_url(own_redis):
    server = own_redis("p@ss:/wörd")
    port = server.port
    with pytest.raises(AuthError, match="NOAUTH"):
        Redis(f"redis://127.0.0.1:{port}/0").ping()
    with pytest.raises(AuthError, match="WRONGPASS"):
        Redis(f"redis://127.0.0.1:{port}/0", password="nope").ping()
    Redis(f"redis://:p%40ss%3A%2Fw%C3%B6rd@127.0.0.1:{port}/3").set("k", "db3")
    Redis(f"redis://127.0.0.1:{port}?db=4", password="p@ss:/wörd").set("k", "db4")
    admin = redis.Redis(port=port, password="p@ss:/wörd")
    assert [admin.execute_command("SELECT", db) and admin.get("k") for db in (0, 3, 4)] == \
        [None, b"db3", b"db4"]
    admin.acl_setuser("alice", enabled=True, passwords=["+alice-pw"], keys=["a:*"],
                      commands=["+@all"])
    alice = Redis(f"redis://alice:alice-pw@127.0.0.1:{port}/0")
    alice.set("a:1", "ok")
    with pytest.raises(ResponseError, match="NOPERM"):
        alice.set("b:1", "no")


def test_a_unix_socket_url(tmp_path):
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([_redis_binary(), "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 20, "the unix socket")
        unix = Redis(f"unix://{sock}?db=2")
        wait_for(lambda: _pings(unix), 20, "redis-server to answer on the socket")
        unix.set("k", "v")
        assert redis.Redis(unix_socket_path=str(sock), db=2).get("k") == b"v"
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(r: Redis) -> bool:
    try:
        return r.ping()
    except ConnectError:
        return False


def test_pubsub_waits_for_messages_and_times_out_without_one(r, client, namespace):
    sub = r.pubsub()
    sub.subscribe(f"{namespace}:ch")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    assert sub.get_message(timeout=0.01) is None
    client.publish(f"{namespace}:ch", "one")
    client.publish(f"{namespace}:ch", "two")
    got = [sub.get_message(timeout=5) for _ in range(2)]
    assert [(m["type"], m["channel"], m["data"]) for m in got] == [
        ("message", f"{namespace}:ch".encode(), b"one"),
        ("message", f"{namespace}:ch".encode(), b"two")]
    sub.close()
    wait_for(lambda: client.pubsub_numsub(f"{namespace}:ch")[0][1] == 0, 10, "unsubscribed")


def test_threads_share_a_client_without_mixing_replies(r, namespace):
    errors: list[str] = []

    def hammer(n: int) -> None:
        for i in range(300):
            pipe = r.pipeline()
            pipe.command("SET", f"{namespace}:{n}", f"{n}-{i}")
            pipe.command("GET", f"{namespace}:{n}")
            if pipe.execute()[1] != f"{n}-{i}".encode():
                errors.append(f"thread {n} step {i}")

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_url_options_are_config_errors():
    with pytest.raises(ConfigError, match="unsupported Redis URL option"):
        Config(url="redis://127.0.0.1:6379/0?socket_timeout=3").client()
    with pytest.raises(ConfigError, match="ssl_cert_reqs must be"):
        Config(url="rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe").client()


@pytest.mark.parametrize("url, message", [
    ("redis://h/abc", "database must be a non-negative integer, got 'abc'"),
    ("redis://h/0/1", "database must be a non-negative integer, got '0/1'"),
    ("redis://h?db=-1", "database must be a non-negative integer, got '-1'"),
    ("redis://h/0?db=", "database must be a non-negative integer, got ''"),
    ("redis://h/0?sslmode", r"unsupported Redis URL option\(s\): sslmode "),
    ("redis://h/0?timeout=", r"unsupported Redis URL option\(s\): timeout "),
    ("rediss://h/0?ssl_ca_certs=", "ssl_ca_certs is empty"),
    # The password 12/secret: urlsplit ends the host at its '/', and the rest is the database.
    ("redis://:12/secret@h/0", r"database must be a non-negative integer, got '\*\*\*@h/0'"),
])
def test_a_url_redis_cannot_be_given_is_refused_in_one_line(url, message):
    """Not Python's own words about int(), and no option dropped because it has no value."""
    with pytest.raises(ValueError, match=f"^{message}") as refused:
        Redis(url)
    assert "\n" not in str(refused.value) and "secret" not in str(refused.value)


def test_redis_py_is_not_what_the_runtime_imports():
    """The reason this client exists: `distcomp` commands start without importing redis-py."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, distcomp.cli, distcomp.worker; print('redis' in sys.modules)"],
        cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` and its key, the certificate its own CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_a_tls_url_verifies_the_server_unless_told_not_to(tmp_path):
    cert, key = _self_signed(tmp_path)
    port = free_port()
    proc = subprocess.Popen([_redis_binary(), "--port", "0", "--tls-port", str(port),
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    try:
        trusted = Redis(f"rediss://localhost:{port}/0?ssl_ca_certs={cert}", retries=0)
        wait_for(lambda: _pings(trusted), 20, "redis-server to answer over TLS")
        trusted.set("k", "over tls")
        assert trusted.execute("GET", "k") == b"over tls"
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            Redis(f"rediss://localhost:{port}/0", retries=0).ping()
        assert Redis(f"rediss://localhost:{port}/0?ssl_cert_reqs=none", retries=0).ping()
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_loading_its_data_is_waited_out_like_an_outage(own_redis):
    """A restarted Redis answers LOADING until its data is read; commands are tried again
    (with backoff) instead of failing as errors."""
    server = own_redis()
    admin = redis.Redis(port=server.port)
    admin.mset({f"k{i}": i for i in range(4000)})
    admin.save()
    server.stop()
    port = server.port
    base = [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(server.dir),
            "--save", "", "--appendonly", "no"]
    # Slow loading down (0.5 ms a key) and serve clients while it lasts (every 1 KiB read).
    proc = subprocess.Popen([*base, "--key-load-delay", "500",
                             "--loading-process-events-interval-bytes", "1024"],
                            stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _accepts(port), 20, "redis-server to accept connections")
        with pytest.raises(ConnectError, match="LOADING"):
            Redis(f"redis://127.0.0.1:{port}/0", retries=0).execute("GET", "k1")
        assert Redis(f"redis://127.0.0.1:{port}/0", retries=12).execute("GET", "k3999") == b"3999"
    finally:
        proc.terminate()
        proc.wait(10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def test_the_first_reply_waits_the_connect_timeout_and_later_ones_the_timeout(redis_server,
                                                                              namespace):
    """A listener that accepts and never answers is found out within ``connect_timeout``;
    once Redis has answered, a reply may take up to ``timeout`` (long commands)."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        mute = Redis(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout=30,
                     connect_timeout=0.3, retries=0)
        with pytest.raises(ConnectError, match="no reply within 0.3s"):
            mute.ping()
    finally:
        silent.close()
    patient = Redis(redis_server.url, timeout=5, connect_timeout=0.3, retries=0)
    assert patient.ping()
    assert patient.execute("BLPOP", f"{namespace}:never", 1) is None


@pytest.mark.parametrize("url, message", [
    ("redis://a..b:6379/0", "host name 'a..b' is not valid"),
    ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem",
     "ssl_ca_certs /nonexistent/ca.pem: cannot read"),
])
def test_hosts_and_ca_files_that_cannot_work_are_config_errors(url, message):
    with pytest.raises(ConfigError, match=message):
        Config(url=url).client()


@pytest.mark.parametrize("reply", [b"*abc\r\n", b":1x\r\n", b"$\r\n", b"+OK\r\n", b":1\r\n"])
def test_a_server_that_is_not_redis_is_a_connect_error_in_one_line(reply):
    """A number that is not one in a reply's header was a ValueError, and a PING answered with
    anything but PONG went on to the first command's reply: both ended in a traceback."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(reply)

    threading.Thread(target=answer, daemon=True).start()
    url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    try:
        with pytest.raises(ConnectError, match="unexpected reply from Redis"):
            Redis(url, timeout=5, retries=0).ping()
        proc = subprocess.run([sys.executable, "-m", "distcomp", "--redis", url, "status"],
                              capture_output=True, text=True, timeout=60, check=False)
    finally:
        server.close()
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"distcomp: error: cannot reach Redis at {url}: unexpected "
                                  "reply from Redis") and proc.stderr.count("\n") == 1, proc.stderr
