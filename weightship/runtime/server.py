"""The OpenAI-compatible HTTP server: FastAPI routes over the engine, run by uvicorn.

Routes (:mod:`weightship.runtime.routes`): ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events ending in
``data: [DONE]``), ``GET /health``, ``GET /ready``, ``GET /metrics``; ``GET /v1/usage`` and
``GET /v1/keys`` are the :class:`~weightship.runtime.usage.Meter`'s. The engine runs on its own
thread; each request's outputs come back through an asyncio queue fed with
``call_soon_threadsafe`` (:mod:`weightship.runtime.run`). A client that disconnects has its
requests cancelled, which frees their cache slots.

The event loop answers every request, ``/health`` included, so nothing a request asks for may
hold it long. A prompt's text is measured before it is tokenized (a text longer than
``ServerState.max_prompt_bytes`` cannot fit in the context, whatever its tokens), and tokenized
on a worker thread (SentencePiece lets go of the GIL). The log-probabilities a response may
hold are bounded (``ServerState.max_logprobs``), and a response that holds any is built and
encoded on a worker thread, in pieces (:mod:`weightship.runtime.answers`).

A :class:`~weightship.runtime.loop_monitor.LoopMonitor` reports how long the loop is ever
kept from running (``weightship_event_loop_blocked_seconds``).

The layers, outermost first: the :class:`~weightship.runtime.middleware.Guard` (sizes, keys,
draining), the :class:`~weightship.runtime.usage.Meter` (scopes, usage records), FastAPI with
the routes and one error table (:mod:`weightship.runtime.api_errors`).

Shutdown (SIGTERM; see :mod:`weightship.runtime.runner`): uvicorn stops listening and waits
for the open requests to finish, the Guard answers 503 to new requests on kept-alive
connections, ``/ready`` turns 503, and the engine stops once its last request is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from weightship.runtime import api_errors
from weightship.runtime.keys import KeyRing
from weightship.runtime.loop_monitor import LoopMonitor
from weightship.runtime.middleware import Guard
from weightship.runtime.routes import router
from weightship.runtime.state import ServerState
from weightship.runtime.usage import Meter

__all__ = ["ServerState", "create_app"]


def create_app(state: ServerState) -> Guard:
    """The ASGI app: the API routes inside the Meter inside the :class:`Guard`."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with LoopMonitor(state.metrics.loop_blocked).running():
            yield
        state.draining = True
        if state.engine is not None:  # uvicorn has waited for every open request by now
            await asyncio.to_thread(state.engine.stop)

    api = FastAPI(title="weightship", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.server = state
    api.include_router(router)
    for kind in (*(cls for cls, _ in api_errors.API_ERRORS), RequestValidationError, HTTPException, Exception):
        api.add_exception_handler(kind, api_errors.handle)
    keys = state.keyring or (KeyRing.of_keys(state.api_keys) if state.api_keys else None)
    meter = Meter(api, usage_log=state.usage_log, registry=state.metrics.registry,
                  model_name=state.model_name, keyring=keys)
    return Guard(meter, limits=state.limits, api_keys=keys, metrics=state.metrics,
                 draining=lambda: state.draining)
