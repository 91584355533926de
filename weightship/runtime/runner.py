"""Running the server: uvicorn with draining on SIGTERM while the model loads on a thread
(:func:`serve_until_stopped`, what ``weightship serve`` runs), or on a thread of its own for
tests and demos (:class:`BackgroundServer`)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from weightship.runtime.server import ServerState, create_app
from weightship.threaded_server import ThreadedServer


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


def serve_until_stopped(state: ServerState, load: Callable[[], None], *, host: str, port: int) -> None:
    """Serve ``state`` on ``host``:``port`` until SIGTERM, which drains (see
    :mod:`weightship.runtime.server`).

    It listens at once (``/health`` answers, ``/ready`` says loading) while ``load`` runs on a
    thread (it loads the model and attaches the engine to ``state``). A ``load`` that raises
    stops the server, and what it raised is raised here once the server has stopped. The usage
    log is closed on the way out (its last records synced).
    """
    server = make_server(state, host=host, port=port, log_level="info")
    failure: list[BaseException] = []

    def loading() -> None:
        try:
            load()
        except BaseException as e:  # reported by the main thread once the server has stopped
            failure.append(e)
            server.should_exit = True

    threading.Thread(target=loading, name="weightship-load", daemon=True).start()
    try:
        server.run()
    finally:
        if state.usage_log is not None:
            state.usage_log.close()
    if failure:
        raise failure[0]


class BackgroundServer(ThreadedServer):
    """A server for ``state`` on a free loopback port, run on a thread (tests, the demo, the
    benchmark); ``url`` is its base URL."""

    def __init__(self, state: ServerState) -> None:
        super().__init__(make_server(state), name="weightship")
        self.state = state
        self.url = self.base_url()

    def stop(self, timeout: float = 30.0) -> None:
        self.state.draining = True
        super().stop(timeout)
