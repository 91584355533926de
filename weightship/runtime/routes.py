"""The HTTP routes, module-level on one router; each gets the :class:`ServerState` from the
``state`` dependency (the app's ``state.server``, set by :func:`~weightship.runtime.server.create_app`).

A completion or chat request goes: its body read within bounds and validated
(:func:`~weightship.runtime.bodies.read_request`, once the model is loaded; a large
body on a worker thread) →
:func:`~weightship.runtime.checks.serving` (the model named, nothing unsupported) → its size
checks (:mod:`weightship.runtime.checks`) → tokenized on a worker thread →
:func:`~weightship.runtime.run.start` (the engine requests) →
:func:`~weightship.runtime.answers.respond` (whole or streamed).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from weightship.errors import ModelNotServedError
from weightship.runtime.answers import respond
from weightship.runtime.bodies import read_request
from weightship.runtime.checks import (
    Prompt,
    body_limits,
    check_choices,
    check_text_size,
    completion_prompts,
    serving,
)
from weightship.runtime.protocol import ChatCompletionRequest, CompletionRequest
from weightship.runtime.run import start
from weightship.runtime.state import ServerState
from weightship.runtime.tokenizer import Tokenizer

router = APIRouter()


async def server_state(request: Request) -> ServerState:
    """The dependency that gives a route the server's state (async: FastAPI would run a plain
    function on a worker thread)."""
    state: ServerState = request.app.state.server
    return state


State = Annotated[ServerState, Depends(server_state)]


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: answered as long as the event loop runs."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State) -> JSONResponse:
    """Readiness: 200 once the engine is warm, 503 while loading or draining."""
    if state.ready and not state.draining:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "draining" if state.draining else "loading"}, status_code=503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def model_card(state: ServerState) -> dict[str, Any]:
    """The served model as ``/v1/models`` lists it."""
    length = state.engine.args.max_model_len if state.engine else None
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "weightship", "max_model_len": length}


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, state: State) -> dict[str, Any]:
    if model_id != state.model_name:
        raise ModelNotServedError(model_id, state.model_name)
    return model_card(state)


def tokenize_prompts(tok: Tokenizer, prompts: list[Prompt], echo: bool) -> tuple[list[list[int]], list[str] | None]:
    """Token ids of each prompt (a text with BOS), and with ``echo`` each prompt's text."""
    ids = [tok.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]
    texts = ([p if isinstance(p, str) else tok.decode(i) for p, i in zip(prompts, ids, strict=True)]
             if echo else None)
    return ids, texts


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, state: State) -> Response:
    body = await read_request(request, CompletionRequest, body_limits(state))
    engine, tok = serving(state, body)
    prompts = completion_prompts(state, body, engine.args.max_model_len)
    ids, echo = await asyncio.to_thread(tokenize_prompts, tok, prompts, body.echo)
    run = start(state, engine, body, ids, contexts=ids, default_max=16)
    return await respond(run, body, request, tok, echo)


@router.post("/v1/chat/completions", response_model=None)
async def chat(request: Request, state: State) -> Response:
    body = await read_request(request, ChatCompletionRequest, body_limits(state))
    engine, tok = serving(state, body)
    check_choices(state, body.n, 1)
    messages = [m.to_chat() for m in body.messages]
    check_text_size(state, [m.content for m in messages], "messages")
    prompt = await asyncio.to_thread(tok.encode_chat, messages)
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    run = start(state, engine, body, [prompt], contexts=[[]], default_max=None)
    return await respond(run, body, request, tok)
