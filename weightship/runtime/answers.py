"""A run's outputs as the OpenAI answer: one JSON body, or server-sent events ending in
``data: [DONE]``.

A whole answer with log-probabilities (up to ``ServerState.max_logprobs`` of them: megabytes) is
built and encoded (:func:`~weightship.runtime.protocol.encode_json`) on a worker thread, and so
is a streamed chunk with many (an echoed prompt's). A client that hangs up is noticed
(:func:`cancel_on_disconnect`, or the stream's generator closed): its run is cancelled, and a
whole answer is not sent at all (the Meter records 499).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from weightship.runtime.api_errors import api_error
from weightship.runtime.logprobs import ResponseLogprobs, TokenLogprob
from weightship.runtime.protocol import ChatCompletionRequest, CommonParams, encode_json, error_body
from weightship.runtime.request import FinishReason
from weightship.runtime.run import Run
from weightship.runtime.tokenizer import Tokenizer
from weightship.runtime.usage import RUN_SCOPE

# A streamed chunk with more tokens' log-probabilities than this is built on a worker thread.
_INLINE_LOGPROBS = 64


def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's finish_reason of the engine's (a cancelled or failed choice says "stop")."""
    return "length" if reason == "length" else None if reason is None else "stop"


async def respond(run: Run, body: CommonParams, request: Request, tok: Tokenizer,
                  echo: list[str] | None = None) -> Response:
    """The answer to a completions (``echo``: per prompt, the text to put in front of its
    choices) or chat request, whole or streamed."""
    request.scope[RUN_SCOPE] = run  # the usage the Meter records is the one sent
    chat = isinstance(body, ChatCompletionRequest)
    ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    logprobs = (ResponseLogprobs(tok, chat, echo is not None)
                if body.token_logprobs()[0] is not None else None)
    if body.stream:
        return StreamingResponse(stream(run, body, ident, logprobs, echo), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await whole(run, body, request, ident, logprobs, echo)


async def whole(run: Run, body: CommonParams, request: Request, ident: str,
                logprobs: ResponseLogprobs | None, echo: list[str] | None) -> Response:
    """The answer as one JSON body, once every choice has finished."""
    texts: dict[int, list[str]] = {}
    reasons: dict[int, FinishReason | None] = {}
    entries: dict[int, list[TokenLogprob]] = {}
    watcher = asyncio.create_task(cancel_on_disconnect(request, run))
    try:
        async for index, out in run.events():
            texts.setdefault(index, []).append(out.text)
            entries.setdefault(index, []).extend([*(out.prompt_logprobs or ()), *(out.logprobs or ())])
            if out.finished:
                reasons[index] = out.finish_reason
    finally:
        watcher.cancel()
    if run.disconnected:
        return Unanswered()
    if "error" in reasons.values():
        return api_error(500, "generation failed", type_="server_error")
    chat = isinstance(body, ChatCompletionRequest)

    def encode() -> bytes:
        choices = []
        for index in sorted(reasons):
            text = (echo[index // body.n] if echo else "") + "".join(texts[index])
            choice: dict[str, Any] = {"index": index,
                                      "logprobs": logprobs(index, entries[index]) if logprobs else None,
                                      "finish_reason": finish_reason(reasons[index])}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append(choice)
        return encode_json({"id": ident, "object": "chat.completion" if chat else "text_completion",
                            "created": int(time.time()), "model": run.state.model_name,
                            "choices": choices, "usage": run.usage()})

    # with log-probabilities, up to max_logprobs of them: megabytes, built off the loop
    content = await asyncio.to_thread(encode) if logprobs else encode()
    return Response(content, media_type="application/json")


class _Chunks:
    """The server-sent events of one streamed answer."""

    def __init__(self, run: Run, body: CommonParams, ident: str, logprobs: ResponseLogprobs | None) -> None:
        self.chat = isinstance(body, ChatCompletionRequest)
        self.head = {"id": ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": int(time.time()), "model": run.state.model_name}
        self.logprobs = logprobs

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + encode_json({**self.head, "choices": choices, **extra}) + b"\n\n"

    def choice(self, index: int, text: str, entries: list[TokenLogprob], reason: str | None) -> bytes:
        lp = self.logprobs(index, entries) if self.logprobs is not None else None
        if self.chat:
            delta = {"content": text} if text else {}
            return self.event([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}])
        return self.event([{"index": index, "text": text, "logprobs": lp, "finish_reason": reason}])


async def stream(run: Run, body: CommonParams, ident: str, logprobs: ResponseLogprobs | None,
                 echo: list[str] | None) -> AsyncIterator[bytes]:
    """The answer as server-sent events: a chunk per output with text (a choice's log-probability
    entries wait for its next text), usage if asked, then ``[DONE]``. Closing the generator (the
    client went away) cancels the run."""
    chunks = _Chunks(run, body, ident, logprobs)
    pending: dict[int, list[TokenLogprob]] = {}  # tokens whose text is still held back
    started: set[int] = set()
    try:
        if chunks.chat:
            yield chunks.event([{"index": i, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None} for i in range(body.n)])
        async for index, out in run.events():
            if out.finish_reason == "error":
                yield b"data: " + encode_json(error_body("generation failed", type_="server_error")) + b"\n\n"
                continue
            text = out.text
            if index not in started:
                started.add(index)
                text = (echo[index // body.n] if echo else "") + text
            pending.setdefault(index, []).extend([*(out.prompt_logprobs or ()), *(out.logprobs or ())])
            reason = finish_reason(out.finish_reason)
            if not text and reason is None:
                continue
            entries = pending.pop(index)
            if len(entries) > _INLINE_LOGPROBS:  # an echoed prompt's: built off the loop
                yield await asyncio.to_thread(chunks.choice, index, text, entries, reason)
            else:
                yield chunks.choice(index, text, entries, reason)
        if body.include_usage:
            yield chunks.event([], usage=run.usage())
        yield b"data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed early) or we are done
        run.cancel()


async def cancel_on_disconnect(request: Request, run: Run) -> None:
    """Cancel ``run`` if the client hangs up before its response is sent, and mark it so that
    no answer is made (the Meter records the request as cut short, 499)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.disconnected = True
            run.cancel()
            return


class Unanswered(Response):
    """The "response" to a request whose client hung up: nothing is sent (uvicorn expects
    nothing on a closed connection), and the Meter sees that no answer started."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return
