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
            raise ConfigError(f"Redis URL {self.redacted_url()!r}: {exc}") from None

    def redacted_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.password:
            netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
            return parts._replace(netloc=netloc).geturl()
        return self.url


def _read_password_file(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read password file {path}: {exc.strerror}") from None


_WORKER_FLOATS = ("cores", "default_timeout", "heartbeat_ttl", "kill_grace", "sample_interval",
                  "avoid_window", "idle_poll")
_WORKER_INTS = ("max_tasks", "eviction_budget", "tail_bytes")
_WORKER_SIZES = ("memory_limit", "memory_reserve", "evict_below")
_WORKER_STRS = ("name", "results_dir", "workdir", "python")


def _load_worker(section: configparser.SectionProxy, where: str) -> WorkerConfig:
    cfg = WorkerConfig()
    known = set(_WORKER_FLOATS + _WORKER_INTS + _WORKER_SIZES + _WORKER_STRS + ("overcommit",))
    for key in section:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} in [worker]")
    for key in _WORKER_STRS:
        if section.get(key, "").strip():
            setattr(cfg, key, section[key].strip())
    for key, conv in [(k, float) for k in _WORKER_FLOATS] + [(k, int) for k in _WORKER_INTS]:
        if section.get(key, "").strip():
            try:
                setattr(cfg, key, conv(section[key]))
            except ValueError:
                raise ConfigError(f"{where}: [worker] {key} must be a number, "
                                  f"got {section[key]!r}") from None
    for key in _WORKER_SIZES:
        value = section.get(key, "").strip()
        if value:
            setattr(cfg, key, parse_size(value, f"{where}: [worker] {key}"))
    if section.get("overcommit", "").strip():
        cfg.overcommit = parse_overcommit(section["overcommit"], f"{where}: [worker] overcommit")
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
    path = path or os.environ.get("DISTCOMP_CONFIG")
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    if explicit or os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except configparser.Error as exc:
            raise ConfigError(f"config file {path} is not valid INI: "
                              f"{str(exc).splitlines()[0]}") from None
        cfg.source = path
    if parser.has_section("redis"):
        section = parser["redis"]
        cfg.url = section.get("url", cfg.url).strip() or cfg.url
        cfg.namespace = section.get("namespace", cfg.namespace).strip() or cfg.namespace
        if section.get("password", "").strip():
            cfg.password = section["password"].strip()
        elif section.get("password_file", "").strip():
            cfg.password = _read_password_file(section["password_file"].strip())
    if parser.has_section("worker"):
        cfg.worker = _load_worker(parser["worker"], path)
    cfg.url = url or os.environ.get("DISTCOMP_REDIS_URL") or cfg.url
    if os.environ.get("DISTCOMP_REDIS_PASSWORD"):
        cfg.password = os.environ["DISTCOMP_REDIS_PASSWORD"]
    elif password_file:
        cfg.password = _read_password_file(password_file)
    if urlsplit(cfg.url).password:
        cfg.password = unquote(urlsplit(cfg.url).password or "")
    if urlsplit(cfg.url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"Redis URL must start with redis://, rediss:// or unix://, "
                          f"got {cfg.redacted_url()!r}")
    cfg.namespace = namespace or os.environ.get("DISTCOMP_NAMESPACE") or cfg.namespace
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.namespace):
        raise ConfigError(f"namespace {cfg.namespace!r} may only contain letters, digits, "
                          f"'_', '-' and '.'")
    return cfg
