"""A small Redis client: the commands, pipelines, Lua scripts and pub/sub distcomp uses.

Why not redis-py: importing it took 0.15-0.25 s on the test machine (it imports asyncio and its
cluster, sentinel and observability modules), 85-90% of every ``distcomp status``, ``submit``
and ``wait``, and each round trip through it cost the worker loop about 100 us of CPU on top of
the socket's. This speaks RESP2 over one socket per connection and nothing more.

Semantics kept from the client it replaces: bulk replies are ``bytes``; a command that fails
because the connection broke (refused, reset, timed out, Redis loading its data) is sent again
on a new connection after a short backoff, ``retries`` times; a pipeline is sent as one write
and retried whole; error replies inside a pipeline come back in their place as exceptions.
Scripts go out as EVALSHA and are loaded only when Redis answers NOSCRIPT, and then only the
commands that got NOSCRIPT are sent again: a refused script did not run.

``Redis.waiting`` wraps every wait for Redis (sending, reading, the pauses between retries): the
worker lets go of its state there, so that a call that hangs does not stop memory enforcement.
"""

from __future__ import annotations

import contextlib
import hashlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import ssl

_CRLF = b"\r\n"


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class ConnectError(RedisError):
    """Redis could not be reached, the connection broke or a reply did not come in time."""


class ResponseError(RedisError):
    """Redis answered with an error."""


class NoScriptError(ResponseError):
    """EVALSHA of a script Redis does not hold (restarted, or SCRIPT FLUSH)."""


class AuthError(ResponseError):
    """The password is missing or wrong (NOAUTH, WRONGPASS)."""


class RefusedError(ResponseError):
    """Redis is up but will not write for now: at its maxmemory (OOM), unable to persist
    (MISCONF), a read-only replica, busy running a script, or without its master or replicas.
    Nothing was changed (Redis refuses a script at its first write), so the command can be
    sent again once Redis accepts writes."""


_REFUSALS = frozenset(("OOM", "MISCONF", "READONLY", "BUSY", "MASTERDOWN", "NOREPLICAS"))


def _error(text: str) -> RedisError:
    code = text.split(" ", 1)[0]
    if code == "NOSCRIPT":
        return NoScriptError(text)
    if code in ("NOAUTH", "WRONGPASS") or text.startswith("ERR invalid password"):
        return AuthError(text)
    if code == "LOADING":
        return ConnectError(text)
    if code in _REFUSALS:
        return RefusedError(text)
    return ResponseError(text)


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP: strings as UTF-8, numbers as Python writes them."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
        out += (b"$%d\r\n" % len(data), data, _CRLF)
    return b"".join(out)


class Endpoint:
    """Where and how to connect, from a ``redis://``, ``rediss://`` or ``unix://`` URL."""

    def __init__(self, url: str, password: str | None = None) -> None:
        parts = urlsplit(url)
        # Blank values kept: '?timeout=' is an unknown option too, not nothing.
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = sorted(set(query) - {"db", "ssl_cert_reqs", "ssl_ca_certs"})
        if unknown:
            raise ValueError(f"unsupported Redis URL option(s): "
                             f"{', '.join(_masked(k) for k in unknown)} "
                             f"(supported: db, ssl_cert_reqs, ssl_ca_certs)")
        self.scheme = parts.scheme
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else password
        self.path = unquote(parts.path) if parts.scheme == "unix" else ""
        self.host = parts.hostname or "localhost"
        try:
            # what the socket module does to a host name; failing there would not be an OSError
            self.host.encode("idna")
        except UnicodeError:
            raise ValueError(f"host name {self.host!r} is not valid (an empty label as in "
                             f"'a..b', one over 63 characters, or characters DNS cannot carry)"
                             ) from None
        if parts.port == 0:
            raise ValueError("port 0 is not a port Redis listens on (6379 is its default)")
        self.port = 6379 if parts.port is None else parts.port
        if "db" in query:
            db = query["db"]
        else:
            db = (parts.path.strip("/") if parts.scheme != "unix" else "") or "0"
        if not (db.isascii() and db.isdigit()):
            raise ValueError(f"database must be a non-negative integer, got {_masked(db)!r}")
        self.db = int(db)
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "rediss":
            import ssl  # only for TLS: importing it is a tenth of a command's start-up

            cafile = query.get("ssl_ca_certs")
            if cafile == "":
                raise ValueError("ssl_ca_certs is empty: give the CA file or leave the option out")
            try:
                self.tls = ssl.create_default_context(cafile=cafile)
            except ssl.SSLError:
                raise ValueError(f"ssl_ca_certs {_masked(cafile or '')}: no PEM certificate in "
                                 f"it") from None
            except OSError as exc:
                raise ValueError(f"ssl_ca_certs {_masked(cafile or '')}: cannot read: "
                                 f"{exc.strerror}") from None
            reqs = query.get("ssl_cert_reqs", "required")
            if reqs not in ("none", "optional", "required"):
                raise ValueError(f"ssl_cert_reqs must be none, optional or required, "
                                 f"got {_masked(reqs)!r}")
            if reqs != "required":
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE if reqs == "none" else ssl.CERT_OPTIONAL


def _masked(text: str) -> str:
    """``text`` with all before its last '@' masked: a URL's pieces that urlsplit took for
    the database or an option can hold the password."""
    return f"***@{text.rsplit('@', 1)[1]}" if "@" in text else text


class Connection:
    """One socket to Redis and the bytes read from it but not parsed yet."""

    def __init__(self, where: Endpoint, timeout: float, connect_timeout: float) -> None:
        try:
            if where.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(connect_timeout)
                sock.connect(where.path)
            else:
                sock = socket.create_connection((where.host, where.port), connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if where.tls is not None:
                    sock = where.tls.wrap_socket(sock, server_hostname=where.host)
        except OSError as exc:
            raise ConnectError(_describe(exc, where)) from None
        # Until the first bytes come back, wait no longer than for the connection itself: a
        # listener that accepts and never answers (a stuck proxy, not Redis) is then found out
        # in seconds instead of ``timeout`` on every try. Only the first reply is held to this;
        # it answers the handshake or the first command sent (in distcomp a PING, one submit
        # chunk or a read), and the replies after it may take ``timeout``.
        sock.settimeout(min(timeout, connect_timeout))
        self.sock = sock
        self.timeout = timeout
        self.answered = False
        self.buf = bytearray()
        self.pos = 0
        hello: list[tuple[Any, ...]] = []
        if where.password is not None:
            hello.append(("AUTH", where.username, where.password) if where.username
                         else ("AUTH", where.password))
        if where.db:
            hello.append(("SELECT", where.db))
        try:
            self.send(b"".join(pack(cmd) for cmd in hello))
            replies = [self.read() for _ in hello]
        except RedisError:
            self.close()
            raise
        for reply in replies:
            if isinstance(reply, RedisError):
                self.close()
                raise reply

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ConnectError(f"sending to Redis failed: {_reason(exc)}") from None

    def buffered(self) -> bool:
        """Whether a reply can be read without waiting for the network."""
        if self.pos < len(self.buf):
            return True
        # TLS: bytes already decrypted, which select() cannot see
        pending = getattr(self.sock, "pending", None)
        return pending is not None and pending() > 0

    def readable(self, timeout: float) -> bool:
        if self.buffered():
            return True
        return bool(select.select([self.sock], [], [], max(0.0, timeout))[0])

    def _fill(self) -> None:
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            # Which wait ran out says what to raise: --connect-timeout or the command timeout.
            raise ConnectError(f"reading from Redis failed: no reply within "
                               f"{self.sock.gettimeout():g}s") from None
        except OSError as exc:
            raise ConnectError(f"reading from Redis failed: {_reason(exc)}") from None
        if not chunk:
            raise ConnectError("Redis closed the connection")
        if not self.answered:
            self.sock.settimeout(self.timeout)
            self.answered = True
        self.buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(_CRLF, self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos:end])
                self.pos = end + 2
                return line
            self._fill()

    def read(self) -> Any:
        """One reply; an error reply is returned (not raised) as a ``RedisError``."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return _error(rest.decode(errors="replace"))
        try:
            number = int(rest)
        except ValueError:
            number = None  # a server that is not Redis (below)
        if number is not None:
            if kind == b"$":
                if number < 0:
                    return None
                while len(self.buf) - self.pos < number + 2:
                    self._fill()
                data = bytes(self.buf[self.pos:self.pos + number])
                self.pos += number + 2
                return data
            if kind == b":":
                return number
            if kind == b"*":
                return None if number < 0 else [self.read() for _ in range(number)]
        raise ConnectError(f"unexpected reply from Redis: {line[:40]!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


def _describe(exc: OSError, where: Endpoint) -> str:
    target = where.path if where.scheme == "unix" else f"{where.host}:{where.port}"
    return f"connecting to {target} failed: {_reason(exc)}"


class Script:
    """A Lua script called by its SHA1; loaded into Redis on first NOSCRIPT."""

    def __init__(self, client: Redis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, *args: Any) -> Any:
        try:
            return self.client.execute("EVALSHA", self.sha, 0, *args)
        except NoScriptError:
            self.client.execute("SCRIPT", "LOAD", self.source)
            return self.client.execute("EVALSHA", self.sha, 0, *args)


class Redis:
    """Commands over a small pool of connections (one per thread that talks at once)."""

    def __init__(self, url: str, password: str | None = None, *, timeout: float = 30.0,
                 connect_timeout: float = 5.0, retries: int = 3, backoff: float = 0.05,
                 backoff_cap: float = 1.0) -> None:
        self.where = Endpoint(url, password)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        # Entered around each exchange, whatever thread makes it (see the module's docstring).
        self.waiting: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    def connect(self) -> Connection:
        return Connection(self.where, self.timeout, self.connect_timeout)

    def exchange(self, payload: bytes, count: int) -> list[Any]:
        """Send ``payload`` (``count`` commands) and read their replies; on a broken connection
        (or Redis still loading its data) try again on a new one, after a growing pause, up to
        ``retries`` times."""
        attempt = 0
        with self.waiting():
            while True:
                try:
                    replies = self._once(payload, count)
                    loading = next((r for r in replies if isinstance(r, ConnectError)), None)
                    if loading is None:
                        return replies
                    raise loading
                except ConnectError:
                    if attempt >= self.retries:
                        raise
                    attempt += 1
                    time.sleep(min(self.backoff_cap, self.backoff * 2 ** (attempt - 1)))

    def _once(self, payload: bytes, count: int) -> list[Any]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = self.connect()
            conn.send(payload)
            replies = [conn.read() for _ in range(count)]
        except BaseException:  # a connection left half-read is never used again
            if conn is not None:
                conn.close()
            raise
        with self._lock:
            self._idle.append(conn)
        return replies

    def execute(self, *args: Any) -> Any:
        reply = self.exchange(pack(args), 1)[0]
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def script(self, source: str) -> Script:
        return Script(self, source)

    def pipeline(self) -> Pipeline:
        return Pipeline(self)

    def pubsub(self) -> PubSub:
        return PubSub(self)

    # -- the commands distcomp reads with, replies shaped for their callers ------------------
    def ping(self) -> bool:
        """True, or a ``ConnectError`` from a server that answers but is not Redis."""
        reply = self.execute("PING")
        if reply != b"PONG":
            raise ConnectError(f"unexpected reply from Redis to PING: {reply!r:.40}")
        return True

    def set(self, key: str, value: Any) -> None:
        self.execute("SET", key, value)

    def exists(self, *keys: str) -> int:
        return self.execute("EXISTS", *keys)

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return _pairs(self.execute("HGETALL", key))

    def smembers(self, key: str) -> set[bytes]:
        return set(self.execute("SMEMBERS", key))

    def sismember(self, key: str, member: str) -> bool:
        return bool(self.execute("SISMEMBER", key, member))

    def zrange(self, key: str, start: int, stop: int,
               withscores: bool = False) -> list[Any]:
        if not withscores:
            return self.execute("ZRANGE", key, start, stop)
        flat = self.execute("ZRANGE", key, start, stop, "WITHSCORES")
        return [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]

    def zrangebyscore(self, key: str, low: Any, high: Any) -> list[bytes]:
        return self.execute("ZRANGEBYSCORE", key, low, high)

    def zcount(self, key: str, low: Any, high: Any) -> int:
        return self.execute("ZCOUNT", key, low, high)

    def zcard(self, key: str) -> int:
        return self.execute("ZCARD", key)

    def time(self) -> tuple[int, int]:
        seconds, micros = self.execute("TIME")
        return int(seconds), int(micros)

    def scan_iter(self, match: str, count: int = 1000) -> Iterator[bytes]:
        """Every key matching ``match``; SCAN may repeat a key, callers that care dedupe."""
        cursor = b"0"
        while True:
            cursor, keys = self.execute("SCAN", cursor, "MATCH", match, "COUNT", count)
            yield from keys
            if cursor == b"0":
                return


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2]))


class Pipeline:
    """Commands queued here go out in one write when ``execute`` is called; replies come back
    in order, error replies as exceptions in their place (or raised, the first one)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.commands: list[tuple[Any, ...]] = []
        self.shapes: list[Any] = []
        self.scripts: dict[str, Script] = {}

    def command(self, *args: Any, shape: Any = None) -> Pipeline:
        self.commands.append(args)
        self.shapes.append(shape)
        return self

    def script(self, script: Script, *args: Any) -> Pipeline:
        self.scripts[script.sha] = script
        return self.command("EVALSHA", script.sha, 0, *args)

    def hgetall(self, key: str) -> Pipeline:
        return self.command("HGETALL", key, shape=_pairs)

    def hmget(self, key: str, *fields: str) -> Pipeline:
        return self.command("HMGET", key, *fields)

    def pttl(self, key: str) -> Pipeline:
        return self.command("PTTL", key)

    def scard(self, key: str) -> Pipeline:
        return self.command("SCARD", key)

    def zcard(self, key: str) -> Pipeline:
        return self.command("ZCARD", key)

    def zrange(self, key: str, start: int, stop: int) -> Pipeline:
        return self.command("ZRANGE", key, start, stop)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        commands, self.commands = self.commands, []
        shapes, self.shapes = self.shapes, []
        if not commands:
            return []
        replies = self.client.exchange(b"".join(pack(c) for c in commands), len(commands))
        refused = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if refused:
            for script in self.scripts.values():
                self.client.execute("SCRIPT", "LOAD", script.source)
            again = self.client.exchange(b"".join(pack(commands[i]) for i in refused),
                                         len(refused))
            for i, reply in zip(refused, again):
                replies[i] = reply
        for i, shape in enumerate(shapes):
            if shape is not None and not isinstance(replies[i], RedisError):
                replies[i] = shape(replies[i])
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, RedisError):
                    raise reply
        return replies


class PubSub:
    """A connection of its own, subscribed to channels; ``get_message`` waits for the next
    message (the first ones are the subscriptions' confirmations)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.conn: Connection | None = None

    def subscribe(self, *channels: str) -> None:
        if self.conn is None:
            self.conn = self.client.connect()
        self.conn.send(pack(("SUBSCRIBE", *channels)))

    def get_message(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None when none came within ``timeout`` seconds."""
        if self.conn is None:
            raise ConnectError("not subscribed")
        try:
            ready = self.conn.readable(timeout)
        except (OSError, ValueError) as exc:
            raise ConnectError(f"waiting for Redis failed: {exc}") from None
        if not ready:
            return None
        reply = self.conn.read()
        if isinstance(reply, RedisError):
            raise reply
        kind, channel, data = reply[0], reply[1], reply[2]
        return {"type": kind.decode(), "channel": channel, "data": data}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
