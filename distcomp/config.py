"""Configuration: the INI file, environment variables and command-line overrides.

The format is stdlib ``configparser`` so nodes need nothing beyond the runtime's one
dependency (psutil). See docs/contract.md for every key.
"""

from __future__ import annotations

import configparser
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .redis_client import Redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_CONFIG = "/etc/distcomp/distcomp.conf"
OVERCOMMIT_AUTO = "auto"  # overcommit derived from how much of their peak tasks hold
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SCHEMES = ("redis", "rediss", "unix")
# A URL's scheme and host, then what follows the host's ':' up to the path, query or fragment.
_AFTER_HOST = re.compile(rf"(?P<head>(?:{_SCHEME.pattern})?(?:\[[^]]*\]|[^/?#:\[]*))"
                         r"(?::(?P<port>[^/?#]*))?")
# Where configparser's inline_comment_prefixes would cut a value: ';' or '#' at its start or
# after a blank, on any of its lines.
_INLINE_COMMENT = re.compile(r"(?:^|\s+)[;#].*$", re.MULTILINE)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration problem a person can fix; the message says how."""


def parse_size(text: str, what: str) -> int:
    """``512M`` -> bytes. Suffixes are powers of 1024; a bare number is bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{what}: cannot read size {text!r} (use e.g. 512M, 3G or bytes)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


@dataclass
class WorkerConfig:
    name: str = field(default_factory=socket.gethostname)
    results_dir: str = ""
    workdir: str = ""
    python: str = sys.executable
    cores: float = 0.0
    memory_limit: int = 0
    memory_reserve: int | None = None
    evict_below: int | None = None
    max_tasks: int = 0
    default_timeout: float = 0.0
    heartbeat_ttl: float = 10.0
    eviction_budget: int = 10
    kill_grace: float = 2.0
    sample_interval: float = 0.25
    tail_bytes: int = 4096
    avoid_window: float = 60.0
    idle_poll: float = 5.0
    overcommit: float | str = 1.0  # or OVERCOMMIT_AUTO
    own_cgroup: bool = False


@dataclass
class Config:
    url: str = DEFAULT_URL
    password: str | None = None
    namespace: str = "distcomp"
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    source: str | None = None

    def client(self, timeout: float = 30.0, connect_timeout: float = 5.0, retries: int = 3,
               backoff: float = 0.05) -> Redis:
        """A Redis client that retries briefly on connection errors before giving up."""
        try:
            return Redis(self.url, self.password, timeout=timeout,
                         connect_timeout=connect_timeout, retries=retries, backoff=backoff)
        except ValueError as exc:
            raise ConfigError(f"Redis URL {self.redacted_url()!r}: "
                              f"{_url_problem(self.url, exc)}") from None

    def redacted_url(self) -> str:
        """The URL with all it holds before its last '@' masked but a leading ``scheme://``,
        found as text rather than by urlsplit: a password holding '/', '?' or '#' is split
        there by urlsplit and would show, and in a URL mistyped without '://' urlsplit finds
        no user-info at all."""
        if "@" not in self.url:
            return _port_masked(self.url)
        head, host = self.url.rsplit("@", 1)
        scheme = _SCHEME.match(head)
        userinfo = head[scheme.end():] if scheme else head
        # ':***' says "a password, no user" without revealing anything more than '***' does
        mask = ":***" if userinfo.startswith(":") else "***"
        return f"{scheme.group() if scheme else ''}{mask}@{host}"


def _port_masked(url: str) -> str:
    """A URL without '@' with all after its host masked when what follows the host's ':' is
    not a port: 'redis://:PASSWORD' and 'redis://user:PASSWORD' lack only their '@'."""
    found = _AFTER_HOST.match(url)
    if found is None or found.group("port") is None or found.group("port").isdigit():
        return url
    return f"{found.group('head')}:***"


def _userinfo(url: str) -> str | None:
    """What lies between ``://`` and the last ``@`` (the last: a password may hold '@')."""
    if "://" not in url:
        return None
    rest = url.split("://", 1)[1]
    return rest[:rest.rindex("@")] if "@" in rest else None


def _url_problem(url: str, exc: ValueError) -> str:
    """Why the URL was refused, in words that cannot quote the password.

    When the user-info holds '/', '?' or '#', urlsplit ends the host there and its messages
    (a port that is not a number, an unknown option) quote pieces of the password.
    """
    userinfo = _userinfo(url)
    if userinfo is not None and any(c in userinfo for c in "/?#"):
        return ("cannot tell the password from the host: write '/', '?' and '#' in the "
                "password as %2F, %3F and %23")
    # urllib's own messages quote the port or the whole network location, which is where a
    # password sits when its '@' is missing or it holds characters NFKC changes.
    if str(exc).startswith("Port could not be cast"):
        return ("what follows the host's ':' is not a port (a password goes before an '@': "
                "redis://:PASSWORD@HOST:PORT)")
    if "NFKC" in str(exc):
        return ("the host or password holds characters that Unicode normalization (NFKC) "
                "changes: write them percent-encoded (%XX)")
    return str(exc)


def _utf8(text: str, what: str) -> str:
    """``text`` as given, or a ConfigError if it came from bytes that are not UTF-8 (Python
    keeps those as surrogates, which fail only later, when the text is sent to Redis)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None
    return text


def _read_password_file(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        if "/" not in path:
            # Maybe the password itself, given where its file was asked for: not shown.
            raise ConfigError("password file not found (its name is not shown, in case it is "
                              "the password: give the path of a file that holds the "
                              "password, e.g. ./redis.pass)") from None
        raise ConfigError(f"cannot read password file {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read password file {path}: {exc.strerror}") from None
    try:
        password = data.decode("utf-8-sig").strip()  # without a byte-order mark
    except UnicodeDecodeError:
        raise ConfigError(f"password file {path} is not UTF-8 text") from None
    if not password:
        raise ConfigError(f"password file {path} is empty")
    return password


_REDIS_KEYS = ("url", "namespace", "password", "password_file")
_WORKER_FLOATS = ("cores", "default_timeout", "heartbeat_ttl", "kill_grace", "sample_interval",
                  "avoid_window", "idle_poll")
_WORKER_INTS = ("max_tasks", "eviction_budget", "tail_bytes")
_WORKER_SIZES = ("memory_limit", "memory_reserve", "evict_below")
_WORKER_STRS = ("name", "results_dir", "workdir", "python")


def _load_worker(section: configparser.SectionProxy, where: str) -> WorkerConfig:
    cfg = WorkerConfig()
    known = set(_WORKER_FLOATS + _WORKER_INTS + _WORKER_SIZES + _WORKER_STRS +
                ("overcommit", "own_cgroup"))
    for key in section:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} in [worker]")
    for key in _WORKER_STRS:
        if section.get(key, "").strip():
            setattr(cfg, key, section[key].strip())
    for key, conv, kind in ([(k, float, "a number") for k in _WORKER_FLOATS]
                            + [(k, int, "an integer") for k in _WORKER_INTS]):
        if section.get(key, "").strip():
            try:
                setattr(cfg, key, conv(section[key]))
            except ValueError:
                raise ConfigError(f"{where}: [worker] {key} must be {kind}, "
                                  f"got {section[key]!r}") from None
    for key in _WORKER_SIZES:
        value = section.get(key, "").strip()
        if value:
            setattr(cfg, key, parse_size(value, f"{where}: [worker] {key}"))
    if section.get("overcommit", "").strip():
        cfg.overcommit = parse_overcommit(section["overcommit"], f"{where}: [worker] overcommit")
    if section.get("own_cgroup", "").strip():
        try:
            cfg.own_cgroup = section.getboolean("own_cgroup")
        except ValueError:
            raise ConfigError(f"{where}: [worker] own_cgroup must be yes or no, "
                              f"got {section['own_cgroup']!r}") from None
    return cfg


def parse_overcommit(text: str, what: str) -> float | str:
    """``auto`` or a number; whether the number is in range is the worker's to say."""
    text = text.strip()
    if text.lower() == OVERCOMMIT_AUTO:
        return OVERCOMMIT_AUTO
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number or {OVERCOMMIT_AUTO!r}, "
                          f"got {text!r}") from None


def load(path: str | None = None, url: str | None = None, password_file: str | None = None,
         namespace: str | None = None) -> Config:
    """Resolve the configuration with the precedence documented in docs/contract.md."""
    cfg = Config()
    # An option given empty ("$EXP" with EXP unset) is a mistake, not the default: with the
    # default namespace, or the default config file's, `purge --yes` would empty another
    # experiment's queue.
    for option, value in (("--config", path), ("--redis", url),
                          ("--password-file", password_file), ("--namespace", namespace)):
        if value is not None and not value.strip():
            raise ConfigError(f"{option} is empty: give a value, or leave the option out for "
                              f"the default")
    # DISTCOMP_CONFIG= (empty) is how a shell unsets it for one command: it means "not given"
    path = path or os.environ.get("DISTCOMP_CONFIG") or None
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    config_password_file = None
    parser = configparser.ConfigParser(interpolation=None)
    # A header ends at its first ']': '[redis]  ; see [docs]' is [redis], as when
    # inline_comment_prefixes, which _drop_inline_comments stands in for, cut the comment first.
    parser.SECTCRE = re.compile(r"\[(?P<header>[^]]+)\]")
    if explicit or os.path.exists(path):
        _read_config(parser, path)
        _drop_inline_comments(parser, path)
        cfg.source = path
    # configparser reads [DEFAULT] as no section, only as values every section inherits: its
    # url was ignored without a word, and its keys showed up as unknown in [worker].
    for name in parser.sections() + ([parser.default_section] if parser.defaults() else []):
        if name not in ("redis", "worker"):
            raise ConfigError(f"{path}: unknown section [{name}] (expected [redis] and [worker])")
    if parser.has_section("redis"):
        section = parser["redis"]
        for key in section:
            if key not in _REDIS_KEYS:
                raise ConfigError(f"{path}: unknown key {key!r} in [redis]")
        cfg.url = section.get("url", cfg.url).strip() or cfg.url
        cfg.namespace = section.get("namespace", cfg.namespace).strip() or cfg.namespace
        if section.get("password", "").strip():
            cfg.password = section["password"].strip()
        elif section.get("password_file", "").strip():
            # Read last, and only when nothing that takes precedence gave a password.
            config_password_file = section["password_file"].strip()
    if parser.has_section("worker"):
        cfg.worker = _load_worker(parser["worker"], path)
    for variable, option in (("DISTCOMP_REDIS_URL", url), ("DISTCOMP_NAMESPACE", namespace)):
        if option is None and variable in os.environ and not os.environ[variable].strip():
            raise ConfigError(f"{variable} is set but empty: give it a value, or unset it for "
                              f"the default")
    if url is not None and ":" in (_userinfo(url) or ""):
        raise ConfigError("--redis holds a password, which every user of the machine can read "
                          "in the process list: put the URL in DISTCOMP_REDIS_URL or the config "
                          "file, or give the password with --password-file or "
                          "DISTCOMP_REDIS_PASSWORD")
    cfg.url = url or os.environ.get("DISTCOMP_REDIS_URL") or cfg.url
    if os.environ.get("DISTCOMP_REDIS_PASSWORD"):
        cfg.password = _utf8(os.environ["DISTCOMP_REDIS_PASSWORD"], "DISTCOMP_REDIS_PASSWORD")
    elif password_file:
        cfg.password = _read_password_file(password_file)
    elif config_password_file and ":" not in (_userinfo(cfg.url) or ""):
        cfg.password = _read_password_file(config_password_file)
    _check_url(cfg)
    cfg.namespace = namespace or os.environ.get("DISTCOMP_NAMESPACE") or cfg.namespace
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.namespace):
        raise ConfigError(f"namespace {cfg.namespace!r} may only contain letters, digits, "
                          f"'_', '-' and '.'")
    return cfg


def _read_config(parser: configparser.ConfigParser, path: str) -> None:
    """Read the INI file; its errors name the line but never quote it (it may be a password)."""
    try:
        # utf-8-sig: an editor on Windows starts the file with a byte-order mark
        with open(path, encoding="utf-8-sig") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(f"config file {path} is not valid INI: line {exc.lineno} comes "
                          f"before any [section]") from None
    except configparser.ParsingError as exc:
        raise ConfigError(f"config file {path} is not valid INI: line {exc.errors[0][0]} is "
                          f"not '[section]', 'key = value' or a comment") from None
    except configparser.Error as exc:
        raise ConfigError(f"config file {path} is not valid INI: "
                          f"{str(exc).splitlines()[0]}") from None


def _drop_inline_comments(parser: configparser.ConfigParser, path: str) -> None:
    """Cut the ' ;' and ' #' comments off values, as ``inline_comment_prefixes`` would, but
    refuse one after the password: a password may hold ' ;' or ' #', and one cut there would
    only be refused by Redis, with nothing to say why."""
    for name in parser.sections():
        section = parser[name]
        for key in list(section):
            cut = _INLINE_COMMENT.sub("", section[key])
            if cut == section[key]:
                continue
            if (name, key) == ("redis", "password"):
                raise ConfigError(f"{path}: [redis] password holds ' ;' or ' #', which start a "
                                  f"comment in this file: put the password in a "
                                  f"password_file, or remove the comment")
            section[key] = cut


def _check_url(cfg: Config) -> None:
    """Take the password from the URL if it has one, and refuse a URL that cannot work."""
    # Checked as text first: urlsplit reads 'redis:/:pw@h' as a path, which fails later in
    # words that quote the password.
    scheme, sep, _ = cfg.url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ConfigError(f"Redis URL must start with redis://, rediss:// or unix://, "
                          f"got {cfg.redacted_url()!r}")
    try:
        parts = urlsplit(cfg.url)
    except ValueError as exc:
        raise ConfigError(f"Redis URL {cfg.redacted_url()!r}: "
                          f"{_url_problem(cfg.url, exc)}") from None
    if parts.password:
        cfg.password = _utf8(unquote(parts.password), "the password in the Redis URL")
    elif parts.username and cfg.password is None:
        # A user is only sent to Redis with a password (AUTH user password); alone it is
        # most likely a password written without its colon.
        raise ConfigError(f"Redis URL {cfg.redacted_url()!r} gives a user but no password "
                          f"(did you mean redis://:PASSWORD@HOST?)")
