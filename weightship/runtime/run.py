"""The engine requests behind one API request: planned, submitted, and their outputs gathered.

:func:`start` turns a request's prompts into ``n`` engine requests each (``max_tokens`` worked
out, the log-probabilities the answer would hold counted against ``ServerState.max_logprobs``)
and submits them; the :class:`Run` it returns hands their outputs to the event loop (the engine
calls each request's sink on its own thread) and records the latency metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from weightship.errors import InvalidRequestError
from weightship.runtime.engine import Engine
from weightship.runtime.protocol import CommonParams
from weightship.runtime.request import Output
from weightship.runtime.sampling import SamplingParams
from weightship.runtime.state import ServerState


class Run:
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
        """Queue choice ``index``; its outputs come back through :meth:`events`."""
        def sink(out: Output) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        try:
            self.ids.append(self.engine.submit(prompt, params, sink, context=context))
        except BaseException:
            self.cancel()
            raise
        self.unfinished += 1

    def cancel(self) -> None:
        """Cancel every choice (the engine frees their cache slots before its next step)."""
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
        """The ``usage`` object of the answer (what the client is told, and billed)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def max_tokens_of(state: ServerState, body: CommonParams, prompt: list[int], default_max: int | None,
                  context: int) -> int:
    """The ``max_tokens`` of one prompt's choices: the request's; else for chat
    (``default_max`` None) the rest of the context, as far as ``max_logprobs`` allows;
    else (completions) ``default_max``."""
    if body.max_tokens is not None:
        return body.max_tokens
    if default_max is not None:
        return default_max
    max_tokens = max(1, context - len(prompt))
    logprobs = body.token_logprobs()[0]
    if logprobs is not None:
        max_tokens = max(1, min(max_tokens, state.max_logprobs // (body.n * (1 + logprobs))))
    return max_tokens


def start(state: ServerState, engine: Engine, body: CommonParams, prompts: list[list[int]],
          contexts: list[list[int]], default_max: int | None) -> Run:
    """Submit ``body.n`` choices of each of ``prompts`` (``contexts``: the tokens each choice's
    text continues, see :meth:`Engine.submit`), once the answer is known to hold at most
    ``max_logprobs`` log-probabilities."""
    logprobs, prompt_logprobs = body.token_logprobs()
    plan = []
    wanted = 0  # log-probabilities in the response
    for prompt, context in zip(prompts, contexts, strict=True):
        max_tokens = max_tokens_of(state, body, prompt, default_max, engine.args.max_model_len)
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
    run = Run(state, engine)
    for i, (prompt, context, max_tokens) in enumerate(plan):
        for j in range(body.n):
            run.submit(i * body.n + j, prompt, body.sampling(max_tokens, j), context)
        run.prompt_tokens += len(prompt)
    state.metrics.prompt_tokens.inc(run.prompt_tokens * body.n)
    return run
