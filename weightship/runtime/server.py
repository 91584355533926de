"""The OpenAI-compatible HTTP server: FastAPI routes over the engine, run by uvicorn.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streamed as server-sent events ending in ``data: [DONE]``),
``GET /health``, ``GET /ready``, ``GET /metrics``. The engine runs on its own thread; each
request's outputs come back through an asyncio queue fed with ``call_soon_threadsafe``. A client
that disconnects has its requests cancelled, which frees their cache slots.

The event loop answers every request, ``/health`` included, so nothing a request asks for may
hold it long. A prompt's text is measured before it is tokenized (a text longer than
``ServerState.max_prompt_bytes`` cannot fit in the context, whatever its tokens), and tokenized
on a worker thread (SentencePiece lets go of the GIL). The log-probabilities a response may
hold are bounded (``ServerState.max_logprobs``), and a response that holds any is built and
encoded on a worker thread, in pieces (:func:`~weightship.runtime.protocol.encode_json`).

Shutdown (SIGTERM; see :mod:`weightship.runtime.runner`): uvicorn stops listening and waits
for the open requests to finish, the :class:`~weightship.runtime.middleware.Guard` answers 503
to new requests on kept-alive connections, ``/ready`` turns 503, and the engine stops once its
last request is done.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from weightship.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    ModelNotServedError,
)
from weightship.runtime.engine import Engine
from weightship.runtime.keys import KeyRing
from weightship.runtime.logprobs import ResponseLogprobs, TokenLogprob
from weightship.runtime.metrics import Metrics
from weightship.runtime.middleware import Guard, Limits
from weightship.runtime.protocol import (
    ChatCompletionRequest,
    CommonParams,
    CompletionRequest,
    encode_json,
    error_body,
)
from weightship.runtime.request import Output
from weightship.runtime.sampling import SamplingParams
from weightship.runtime.tokenizer import Tokenizer
from weightship.runtime.usage import RUN_SCOPE, Meter, UsageLog

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share: the engine once loaded, readiness, draining, metrics."""

    model_name: str
    api_keys: frozenset[str] = frozenset()
    keyring: KeyRing | None = None  # wins over api_keys: a key file, reloaded when it changes
    usage_log: UsageLog | None = None  # one record per finished API request (runtime/usage.py)
    limits: Limits = field(default_factory=Limits)
    max_choices: int = 16  # n × prompts per request; more is refused as absurd
    # Log-probabilities one response may hold: choices × scored tokens × (1 + alternatives),
    # counted from what the request asks (echo, max_tokens, n). More is refused (400). This
    # leaves room for lm-evaluation-harness's scoring requests (echo, logprobs=1, max_tokens=1)
    # of 16 prompts of 4,095 tokens, about 4 MB of JSON, but not for an 11 KB request (echo,
    # logprobs=20, n=16, 2,041 prompt tokens) asking for 686,112 of them, 19 MB. A chat request
    # that asks for log-probabilities without max_tokens gets a default that fits (its
    # finish_reason says "length" if it runs out).
    max_logprobs: int = 1 << 17
    engine: Engine | None = None
    tokenizer: Tokenizer | None = None
    ready: bool = False
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    # UTF-8 bytes of prompt text that can fit in the context at all (the context length × the
    # bytes one token stands for, at most): a longer text is refused before it is tokenized.
    max_prompt_bytes: int = 0

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else None)

    def attach(self, engine: Engine, tokenizer: Tokenizer) -> None:
        """Warm ``engine`` (every decode shape, then one short request), start it, turn ready."""
        self.max_prompt_bytes = engine.args.max_model_len * tokenizer.max_token_bytes
        self.engine, self.tokenizer = engine, tokenizer
        engine.warm_up()
        engine.start()
        engine.generate([tokenizer.bos_id], SamplingParams(max_tokens=2, temperature=0))
        # The hundreds of thousands of objects of the libraries and the model live as long as the
        # process: out of the collector's sight, so that a full collection (which the many small
        # objects of a large response set off) does not walk them all holding the GIL (0.37 s
        # of stalled event loop, measured on the tiny model).
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("engine warm; serving %s", self.model_name)


class _Run:
    """The engine requests behind one API request (``n`` × prompts choices)."""

    def __init__(self, state: ServerState, engine: Engine) -> None:
        self.state, self.engine = state, engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.arrival = time.monotonic()
        self.ids: list[str] = []
        self.first: dict[int, float] = {}
        self.unfinished = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.disconnected = False  # the client hung up: the answer is not sent (recorded 499)
        self.failed = False  # a choice ended with an engine error (recorded 500)

    def submit(self, index: int, prompt: list[int], params: SamplingParams, context: list[int]) -> None:
        def sink(out: Output) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        try:
            self.ids.append(self.engine.submit(prompt, params, sink, context=context))
        except BaseException:
            self.cancel()
            raise
        self.unfinished += 1

    def cancel(self) -> None:
        for rid in self.ids:
            self.engine.cancel(rid)

    async def events(self) -> AsyncIterator[tuple[int, Output]]:
        """Outputs as they come, until every choice has finished; records the metrics."""
        m = self.state.metrics
        while self.unfinished:
            index, out = await self.queue.get()
            now = time.monotonic()
            if out.token_ids and index not in self.first:
                self.first[index] = now
                m.time_to_first_token.observe(now - self.arrival)
            m.generation_tokens.inc(len(out.token_ids))
            if out.finished:
                self.unfinished -= 1
                self.completion_tokens += out.completion_tokens
                self.failed |= out.finish_reason == "error"
                if out.completion_tokens > 1 and index in self.first:
                    m.time_per_output_token.observe((now - self.first[index]) / (out.completion_tokens - 1))
            yield index, out

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class _ErrorResponse(JSONResponse):
    """An error body in ASCII JSON: what it quotes from a request (a field name, a model id)
    may hold anything, a lone surrogate included, and must not fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def _api_error(status: int, message: str, *, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return _ErrorResponse(error_body(message, type_=type_, param=param, code=code), status_code=status,
                          headers=headers)


def _utf8_longer_than(texts: list[str], limit: int) -> bool:
    """Whether ``texts`` are more than ``limit`` bytes of UTF-8 together (their length in
    characters decides huge ones without encoding them)."""
    return sum(map(len, texts)) > limit or sum(len(t.encode()) for t in texts) > limit


# Parts of a validation error's location that name no field: the body, the union members tried.
_NOT_FIELDS = frozenset({"body", "str", "int", "float", "bool", "list", "dict"})

# A streamed chunk with more tokens' log-probabilities than this is built on a worker thread.
_INLINE_LOGPROBS = 64


def _finish_reason(reason: str | None) -> str | None:
    return "length" if reason == "length" else None if reason is None else "stop"


def create_app(state: ServerState) -> Guard:
    """The ASGI app: the API routes inside the :class:`Guard`."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.draining = True
        if state.engine is not None:  # uvicorn has waited for every open request by now
            await asyncio.to_thread(state.engine.stop)

    api = FastAPI(title="weightship", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return _api_error(400, f"the body is not JSON: {first.get('ctx', {}).get('error')} "
                                   f"(at character {first.get('loc', ('', '?'))[-1]})")
        # the fields and indexes, not the union members tried ("str", "function-after[…]")
        loc = [str(p) for p in first.get("loc", ())
               if isinstance(p, int) or (p.isidentifier() and p not in _NOT_FIELDS)]
        why = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return _api_error(400, f"{'.'.join(loc) or 'body'}: {why}", param=loc[0] if loc else None)

    @api.exception_handler(InvalidRequestError)
    async def _refused(_: Request, e: InvalidRequestError) -> JSONResponse:
        return _api_error(400, str(e), param=e.param, code=e.code)

    @api.exception_handler(EngineOverloadedError)
    async def _busy(_: Request, e: EngineOverloadedError) -> JSONResponse:
        return _api_error(429, str(e), type_="server_busy", code="queue_full",
                          headers={"Retry-After": str(e.retry_after)})

    @api.exception_handler(ModelNotServedError)
    async def _no_model(_: Request, e: ModelNotServedError) -> JSONResponse:
        return _api_error(404, str(e), param="model", code="model_not_found")

    @api.exception_handler(EngineStoppedError)
    async def _stopped(_: Request, e: EngineStoppedError) -> JSONResponse:
        return _api_error(503, str(e), type_="server_error", headers={"Retry-After": "1"})

    @api.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return _api_error(e.status_code, str(e.detail), type_="not_found_error"
                          if e.status_code == 404 else "invalid_request_error")

    @api.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return _api_error(500, "internal error", type_="server_error")

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready() -> JSONResponse:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "draining" if state.draining else "loading"}, status_code=503)

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        length = state.engine.args.max_model_len if state.engine else None
        return {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "weightship", "max_model_len": length}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != state.model_name:
            raise ModelNotServedError(model_id, state.model_name)
        return model_card()

    @api.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine, tok = _serving(body)
        if body.suffix:
            raise InvalidRequestError("suffix is not supported: the model has no fill-in-the-middle",
                                      param="suffix")
        raw = body.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]  # type: ignore[assignment]
        if not raw:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        _check_choices(body.n, len(raw))
        for p in raw:
            if not p:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            if isinstance(p, str):
                _check_text_size([p], "prompt")
            elif len(p) > engine.args.max_model_len:  # type: ignore[arg-type]
                # refused here, before the engine checks each of its tokens on the event loop
                raise InvalidRequestError(f"the prompt ({len(p)} tokens) is longer than the context "  # type: ignore[arg-type]
                                          f"({engine.args.max_model_len} tokens)", param="prompt",
                                          code="context_length_exceeded")

        def tokenize() -> tuple[list[list[int]], list[str] | None]:
            ids = [tok.encode(p, bos=True) if isinstance(p, str) else list(p) for p in raw]  # type: ignore[arg-type]
            echo = ([p if isinstance(p, str) else tok.decode(i) for p, i in zip(raw, ids, strict=True)]
                    if body.echo else None)
            return ids, echo

        prompts, echo = await asyncio.to_thread(tokenize)
        run = _start(engine, body, prompts, contexts=prompts, default_max=16)
        return await _respond(run, body, request, tok, echo)

    @api.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        engine, tok = _serving(body)
        _check_choices(body.n, 1)
        messages = [m.to_chat() for m in body.messages]
        _check_text_size([m.content for m in messages], "messages")
        prompt = await asyncio.to_thread(tok.encode_chat, messages)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        run = _start(engine, body, [prompt], contexts=[[]], default_max=None)
        return await _respond(run, body, request, tok)

    def _serving(body: CommonParams) -> tuple[Engine, Tokenizer]:
        if not state.ready or state.engine is None or state.tokenizer is None:
            raise EngineStoppedError("the model is still loading")
        if body.model is not None and body.model != state.model_name:
            raise ModelNotServedError(body.model, state.model_name)
        body.refuse_unsupported()
        return state.engine, state.tokenizer

    def _check_choices(n: int, prompts: int) -> None:
        if not 1 <= n <= state.max_choices // prompts:
            raise InvalidRequestError(f"n × prompts must be between 1 and {state.max_choices}, got "
                                      f"{n} × {prompts}", param="n")

    def _check_text_size(texts: list[str], param: str) -> None:
        if _utf8_longer_than(texts, state.max_prompt_bytes):
            assert state.engine is not None and state.tokenizer is not None
            raise InvalidRequestError(
                f"the {param} is over {state.max_prompt_bytes} bytes, more than the context "
                f"({state.engine.args.max_model_len} tokens of at most {state.tokenizer.max_token_bytes} "
                "bytes each) can hold", param=param, code="context_length_exceeded")

    def _start(engine: Engine, body: CommonParams, prompts: list[list[int]], contexts: list[list[int]],
               default_max: int | None) -> _Run:
        limit = engine.args.max_model_len
        logprobs, prompt_logprobs = body.token_logprobs()
        plan = []
        wanted = 0  # log-probabilities in the response
        for prompt, context in zip(prompts, contexts, strict=True):
            if body.max_tokens is not None:
                max_tokens = body.max_tokens
            elif default_max is None:  # chat: the rest of the context, and what max_logprobs allows
                max_tokens = max(1, limit - len(prompt))
                if logprobs is not None:
                    max_tokens = max(1, min(max_tokens, state.max_logprobs // (body.n * (1 + logprobs))))
            else:  # completions: OpenAI's 16, if it fits
                max_tokens = default_max
            if logprobs is not None:
                wanted += body.n * max_tokens * (1 + logprobs)
            if prompt_logprobs is not None:
                wanted += body.n * len(prompt) * (1 + prompt_logprobs)
            plan.append((prompt, context, max_tokens))
        if wanted > state.max_logprobs:
            raise InvalidRequestError(
                f"the response would hold {wanted} log-probabilities (choices × scored tokens × "
                f"(1 + alternatives)); this server answers at most {state.max_logprobs} in one "
                "response: ask for fewer choices, tokens or alternatives", param="logprobs",
                code="too_many_logprobs")
        run = _Run(state, engine)
        for i, (prompt, context, max_tokens) in enumerate(plan):
            for j in range(body.n):
                run.submit(i * body.n + j, prompt, body.sampling(max_tokens, j), context)
            run.prompt_tokens += len(prompt)
        state.metrics.prompt_tokens.inc(run.prompt_tokens * body.n)
        return run

    async def _respond(run: _Run, body: CommonParams, request: Request, tok: Tokenizer,
                       echo: list[str] | None = None) -> Response:
        """The answer to a completions (``echo``: per prompt, the text to put in front of its
        choices) or chat request, whole or streamed."""
        request.scope[RUN_SCOPE] = run  # the usage the Meter records is the one sent
        chat = isinstance(body, ChatCompletionRequest)
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        logprobs = (ResponseLogprobs(tok, chat, echo is not None)
                    if body.token_logprobs()[0] is not None else None)
        if body.stream:
            return StreamingResponse(_stream(run, body, ident, logprobs, echo), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str | None] = {}
        entries: dict[int, list[TokenLogprob]] = {}
        watcher = asyncio.create_task(_cancel_on_disconnect(request, run))
        try:
            async for index, out in run.events():
                texts.setdefault(index, []).append(out.text)
                entries.setdefault(index, []).extend([*(out.prompt_logprobs or ()), *(out.logprobs or ())])
                if out.finished:
                    reasons[index] = out.finish_reason
        finally:
            watcher.cancel()
        if run.disconnected:
            return _Unanswered()
        if "error" in reasons.values():
            return _api_error(500, "generation failed", type_="server_error")

        def encode() -> bytes:
            choices = []
            for index in sorted(reasons):
                text = (echo[index // body.n] if echo else "") + "".join(texts[index])
                choice: dict[str, Any] = {"index": index,
                                          "logprobs": logprobs(index, entries[index]) if logprobs else None,
                                          "finish_reason": _finish_reason(reasons[index])}
                choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                choices.append(choice)
            return encode_json({"id": ident, "object": "chat.completion" if chat else "text_completion",
                                "created": int(time.time()), "model": state.model_name,
                                "choices": choices, "usage": run.usage()})

        # with log-probabilities, up to max_logprobs of them: megabytes, built off the loop
        content = await asyncio.to_thread(encode) if logprobs else encode()
        return Response(content, media_type="application/json")

    async def _stream(run: _Run, body: CommonParams, ident: str, logprobs: ResponseLogprobs | None,
                      echo: list[str] | None) -> AsyncIterator[bytes]:
        chat = isinstance(body, ChatCompletionRequest)
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        pending: dict[int, list[TokenLogprob]] = {}  # tokens whose text is still held back
        started: set[int] = set()

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            data = {"id": ident, "object": kind, "created": created, "model": state.model_name,
                    "choices": choices, **extra}
            return b"data: " + encode_json(data) + b"\n\n"

        def choice_event(index: int, text: str, entries: list[TokenLogprob], reason: str | None) -> bytes:
            lp = logprobs(index, entries) if logprobs is not None else None
            if chat:
                delta = {"content": text} if text else {}
                return event([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}])
            return event([{"index": index, "text": text, "logprobs": lp, "finish_reason": reason}])

        try:
            if chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}
                             for i in range(body.n)])
            async for index, out in run.events():
                if out.finish_reason == "error":
                    yield b"data: " + encode_json(error_body("generation failed", type_="server_error")) + b"\n\n"
                    continue
                text = out.text
                if index not in started:
                    started.add(index)
                    text = (echo[index // body.n] if echo else "") + text
                pending.setdefault(index, []).extend([*(out.prompt_logprobs or ()), *(out.logprobs or ())])
                reason = _finish_reason(out.finish_reason)
                if not text and reason is None:
                    continue
                entries = pending.pop(index)
                if len(entries) > _INLINE_LOGPROBS:  # an echoed prompt's: built off the loop
                    yield await asyncio.to_thread(choice_event, index, text, entries, reason)
                else:
                    yield choice_event(index, text, entries, reason)
            if body.include_usage:
                yield event([], usage=run.usage())
            yield b"data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed early) or we are done
            run.cancel()

    keys = state.keyring or (KeyRing.of_keys(state.api_keys) if state.api_keys else None)
    meter = Meter(api, usage_log=state.usage_log, registry=state.metrics.registry,
                  model_name=state.model_name, keyring=keys)
    return Guard(meter, limits=state.limits, api_keys=keys, metrics=state.metrics,
                 draining=lambda: state.draining)


async def _cancel_on_disconnect(request: Request, run: _Run) -> None:
    """Cancel ``run`` if the client hangs up before its response is sent, and mark it so that
    no answer is made (the Meter records the request as cut short, 499)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.disconnected = True
            run.cancel()
            return


class _Unanswered(Response):
    """The "response" to a request whose client hung up: nothing is sent (uvicorn expects
    nothing on a closed connection), and the Meter sees that no answer started."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return
