"""Small helpers shared by the tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> object:
    """Poll until ``predicate`` is truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ReplyLoser:
    """A loopback proxy to Redis that can lose one reply. After ``lose_next()`` the reply to
    the next script call (EVALSHA) is dropped and its connection closed: the command ran in
    Redis and the client cannot know it, as when a link breaks at the wrong moment. ``lost``
    counts the replies dropped."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.armed = threading.Event()
        self.lost = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_next(self) -> None:
        self.armed.set()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            doomed = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, doomed),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, doomed),
                             daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket,
                  doomed: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if b"EVALSHA" in data and self.armed.is_set():
                    self.armed.clear()
                    doomed.set()
                upstream.sendall(data)
        except OSError:
            pass

    def _replies(self, upstream: socket.socket, client: socket.socket,
                 doomed: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if doomed.is_set():
                    self.lost += 1
                    break
                client.sendall(data)
        except OSError:
            pass
        for s in (client, upstream):  # shutdown: close alone waits for the other thread's recv
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
