"""Small helpers the fault tests share (a module of its own: tests/conftest.py exists too, so
``import conftest`` would be ambiguous)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


# -- waiting -----------------------------------------------------------------------------------
def wait_for(what: str, predicate: Callable[[], Any], timeout: float, every: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
