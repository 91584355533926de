"""Running the server: uvicorn with draining on SIGTERM, or on a thread for tests and demos."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from weightship.runtime.server import ServerState, create_app


class _DrainingServer(uvicorn.Server):
    """uvicorn, plus: mark the state draining the moment a signal asks us to stop."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    async def _serve(self, sockets: list[socket.socket] | None = None) -> None:
        await super()._serve(sockets)
        # Drained: exit 0 rather than have uvicorn re-raise the signal that asked us to stop.
        if not self.force_exit:
            self._captured_signals.clear()


def make_server(state: ServerState, *, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``state`` (h11, bounded header size, access log off)."""

    def on_exit() -> None:
        state.draining = True

    config = uvicorn.Config(create_app(state), host=host, port=port, http="h11",
                            h11_max_incomplete_event_size=state.limits.max_header_bytes,
                            log_level=log_level, access_log=False, timeout_keep_alive=5,
                            lifespan="on", server_header=False)
    return _DrainingServer(config, on_exit)


class BackgroundServer:
    """A server on a free loopback port, run on a thread (tests, the demo, the benchmark)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on accepted sockets whose
        # proto says TCP, and without it every answer after a connection's first waited 40 ms
        # (its body sent by Nagle's algorithm only once the client's delayed ACK came).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(state, port=self.port)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="weightship-server", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.draining = True
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
