"""A uvicorn server on a thread of its own, on a free loopback port: the servers the tests, the
demos and the benchmarks start (``weightship serve``'s, :mod:`weightship.runtime.runner`; the
mirror's, :mod:`weightship.mirror.server`).

The listening socket is made here, before the thread starts, so the port is known at once. It
names ``IPPROTO_TCP``: asyncio sets ``TCP_NODELAY`` only on accepted sockets whose protocol says
TCP, and without it every answer after a connection's first waited 40 ms (the body held back by
Nagle's algorithm until the client's delayed ACK of the headers).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TypeVar

import uvicorn

from weightship.errors import ServerStartError

START_TIMEOUT = 30.0  # seconds for uvicorn to start listening (a FastAPI app's lifespan included)

_Server = TypeVar("_Server", bound="ThreadedServer")


class ThreadedServer:
    """``server`` listening on ``host`` (a free port) on a daemon thread; a context manager that
    returns once it accepts connections and stops it on exit."""

    def __init__(self, server: uvicorn.Server, *, host: str = "127.0.0.1", name: str = "weightship") -> None:
        self.server, self.host, self.name = server, host, name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]},
                                       name=f"{name}-server", daemon=True)

    def base_url(self, scheme: str = "http") -> str:
        """The base URL (a literal IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def start(self: _Server) -> _Server:
        """Start the thread and wait until the server accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive():
                raise ServerStartError(self.name, "its thread ended (see the log above)")
            if time.monotonic() > deadline:
                raise ServerStartError(self.name, f"not listening after {START_TIMEOUT:.0f} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to exit (it finishes the requests in flight) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
