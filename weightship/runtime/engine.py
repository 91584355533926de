"""The continuous-batching engine: requests join and leave the running batch between steps.

One thread owns the model. Each :meth:`Engine.step`:
1. applies cancellations (a cancelled request's slot is free for the next admission);
2. admits waiting requests into free KV-cache slots: into the slot whose last sequence began
   with the same tokens (a chat's next turn), which then prefills only the rest;
3. prefills up to ``prefill_chunk`` prompt tokens of newcomers, oldest first: the prompts that
   fit whole in one forward pass together, a longer one a chunk at a time (it takes several
   steps, so running requests keep decoding meanwhile); samples their first tokens;
4. decodes one token for every running request in one batched forward pass.

This module schedules (steps 1 and 2, the engine thread, outputs); the forward passes of steps
3 and 4 are :class:`~weightship.runtime.batching.Batcher`'s, which hands each sampled token back
to :meth:`Engine._accept`.

A request finishes on the end of its turn (``</s>``, ``<|im_end|>``), a stop string,
``max_tokens`` or the context length, and frees its slot at once, so a short request that
arrives during a long one finishes first. Results go to a per-request ``sink`` called on the
engine thread; the server turns it into an asyncio queue.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weightship.errors import EngineOverloadedError, EngineStoppedError, InvalidRequestError
from weightship.runtime.batching import Batcher
from weightship.runtime.cache import KVCache
from weightship.runtime.decoding import DecodeRunner
from weightship.runtime.logprobs import TokenLogprob
from weightship.runtime.model import Transformer
from weightship.runtime.request import Completion, FinishReason, Output, OutputSink, Request
from weightship.runtime.sampling import SamplingParams
from weightship.runtime.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)

_MIN_REUSE = 16  # prompt tokens a slot must hold already to be chosen for them (see Engine._place)


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling limits."""

    # Requests waiting for a slot; one more is refused (HTTP 429) instead of queueing forever.
    max_queue: int = 64
    # Prompt tokens prefilled per step: large is faster for the newcomer, small keeps the
    # running requests' time per token steady while a long prompt is read.
    prefill_chunk: int = 512
    use_graphs: bool | None = None  # CUDA graphs for decode; None = on CUDA
    # torch.compile the whole decode step (a minute or two of compilation at the first steps;
    # fewer, fused kernels per step after that); None = when using CUDA graphs.
    compile_step: bool | None = None
    # While every row of the batch decodes greedily, launch each step before reading the last
    # one's tokens (fed back on the device), so the GPU never waits for the engine's Python.
    # A request that stops at </s> or a stop string costs one discarded step. None = with graphs.
    lookahead: bool | None = None
    # Cache slots (the running batch's limit); None = the model's ModelArgs.max_batch.
    max_batch: int | None = None


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    cache_usage: float  # fraction of KV-cache entries holding a live sequence's keys


class Engine:
    """Schedules requests onto a :class:`Transformer` and its KV cache."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.args = dataclasses.replace(model.args, max_batch=self.config.max_batch or model.args.max_batch)
        self.cache = KVCache(self.args, model.device, model.dtype)
        self.runner = DecodeRunner(model, self.cache, self.config.use_graphs, self.config.compile_step)
        lookahead = self.runner.use_graphs if self.config.lookahead is None else self.config.lookahead
        self.batcher = Batcher(model, self.cache, self.runner, self.args, prefill_chunk=self.config.prefill_chunk,
                               lookahead=lookahead, accept=self._accept)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._cancelled: set[str] = set()
        self._slots: list[Request | None] = [None] * self.args.max_batch
        # Per free slot, the tokens whose keys it still holds at positions 0.. (None: unknown):
        # a newcomer whose prompt starts with them is admitted there and prefills only the rest.
        self._resident: list[list[int] | None] = [None] * self.args.max_batch
        self._seq = itertools.count()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the public side (any thread) --------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: OutputSink, *,
               request_id: str | None = None, detokenize: bool = True,
               context: Sequence[int] = ()) -> str:
        """Queue a request; its outputs go to ``sink``. Returns its id.

        ``context`` are tokens decoded in front of the output so its first token's leading space
        is kept (a completion continues its prompt); a chat answer passes none.
        """
        vocab, limit = self.args.arch.vocab_size, self.args.max_model_len
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        for t in prompt:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise InvalidRequestError(f"token id {t!r} is out of range [0, {vocab})", param="prompt")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias names a token id out of range [0, {vocab})",
                                      param="logit_bias")
        if len(prompt) + params.max_tokens > limit:
            raise InvalidRequestError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the context length ({limit} tokens)", param="max_tokens",
                code="context_length_exceeded")
        decoder = (IncrementalDecoder(self.tokenizer, context)
                   if detokenize and self.tokenizer is not None else None)
        req = Request(request_id or uuid.uuid4().hex, list(prompt), params, sink, decoder,
                      seq=next(self._seq))
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise EngineOverloadedError(len(self._waiting))
            self._waiting.append(req)
            self._cond.notify()
        return req.id

    def cancel(self, request_id: str) -> None:
        """Stop a request; its slot is freed before the next step runs."""
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def stats(self) -> EngineStats:
        running = [r for r in self._slots if r is not None]
        used = sum(min(r.prefilled + len(r.output), self.cache.cache_len) for r in running)
        return EngineStats(len(self._waiting), len(running),
                           used / (self.cache.cache_len * self.args.max_batch))

    def generate(self, prompt: Sequence[int], params: SamplingParams, **kw: object) -> Completion:
        """Run one request to the end (on the engine thread if started, else by stepping here)."""
        results: queue.SimpleQueue[Output] = queue.SimpleQueue()
        self.submit(prompt, params, results.put, **kw)  # type: ignore[arg-type]
        tokens, text, logprobs, prompt_logprobs = [], [], [], []
        while True:
            if self._thread is None:
                while results.empty():
                    self.step()
            out = results.get()
            tokens += out.token_ids
            text.append(out.text)
            logprobs += out.logprobs or []
            prompt_logprobs += out.prompt_logprobs or []
            if out.finished:
                assert out.finish_reason is not None
                return Completion(tokens, "".join(text), out.finish_reason, len(prompt), logprobs,
                                  prompt_logprobs)

    def warm_up(self) -> None:
        """Compile and capture the decode step for every batch and cache-length bucket before
        serving (a minute or two on CUDA; nothing on the eager CPU path)."""
        assert self._thread is None and not any(self._slots) and not self._waiting, "engine in use"
        with torch.inference_mode():
            self.runner.warm_up()

    # ---- the engine thread ------------------------------------------------------------------

    def start(self) -> None:
        """Run steps on a background thread until :meth:`stop`."""
        assert self._thread is None, "engine already started"
        self._thread = threading.Thread(target=self._loop, name="weightship-engine", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish (``drain``) or cancel the others; end the thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            if not drain:
                self._cancelled |= {r.id for r in self._waiting}
                self._cancelled |= {r.id for r in self._slots if r is not None}
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _has_work(self) -> bool:
        return bool(self._waiting or self._cancelled or any(self._slots))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._has_work() and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._has_work():
                    return
            try:
                with torch.inference_mode():
                    self.step()
            except Exception:  # the process must outlive any request: fail the batch, go on
                log.exception("engine step failed; failing the running requests")
                for r in self._slots:
                    if r is not None:
                        self._finish(r, "error", "")

    def step(self) -> bool:
        """One scheduling round (see the module docstring). Returns whether it did anything."""
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [r for r in self._waiting if r.id in cancelled]
            self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
            free = [slot for slot, occupant in enumerate(self._slots) if occupant is None]
            while free and self._waiting:
                req = self._waiting.popleft()
                req.slot, req.prefilled = self._place(req, free)
                free.remove(req.slot)
                self._slots[req.slot] = req
        for r in dropped:
            self._emit(r, Output(r.id, "", [], True, "cancelled", len(r.prompt), 0))
        for running in self._slots:
            if running is not None and running.id in cancelled:
                self._finish(running, "cancelled", "")
        did = self.batcher.prefill(self._slots)
        return self.batcher.decode(self._slots) or did or bool(dropped or cancelled)

    def _place(self, req: Request, free: list[int]) -> tuple[int, int]:
        """The free slot for ``req``, and how many of its prompt tokens that slot holds already:
        the slot whose last sequence shares the longest prefix with the prompt (a chat's next
        turn, a shared system prompt), if it is at least ``_MIN_REUSE`` tokens; else the lowest
        free slot, for a fresh start (low slots keep the decode batch, rows ``0..n-1``, short).

        At least one prompt token is always prefilled (its logits choose the first new token), and
        a request that scores its prompt (``echo``) prefills all of it.
        """
        best, common = free[0], 0
        if req.params.prompt_logprobs is None:
            for slot in free:
                held = self._resident[slot] or []
                n = next((i for i, (a, b) in enumerate(zip(held, req.prompt[:-1], strict=False)) if a != b),
                         min(len(held), len(req.prompt) - 1))
                if n > common:
                    best, common = slot, n
        return (best, common) if common >= _MIN_REUSE else (free[0], 0)

    # ---- outputs ----------------------------------------------------------------------------

    def _accept(self, r: Request, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token; emit its text; finish the request if it is done."""
        r.output.append(token)
        extra: dict[str, list[TokenLogprob] | None] = {"logprobs": None}
        if len(r.output) == 1 and r.params.prompt_logprobs is not None:
            extra["prompt_logprobs"] = r.prompt_logprobs
        p = self.tokenizer
        reason: FinishReason | None = None
        text = ""
        if p is not None and token in p.stop_ids and not r.params.ignore_eos:
            reason = "stop"
        elif r.decoder is not None:
            text = r.decoder.push(token)
        if reason is None and (len(r.output) >= r.params.max_tokens
                               or len(r.prompt) + len(r.output) >= self.args.max_model_len):
            reason = "length"
        if reason is not None and r.decoder is not None:
            text += r.decoder.flush()
        text, hit, released = r.release(text, reason is not None, logprob)  # entries held with text
        if logprob is not None:
            extra["logprobs"] = released
        if hit:
            reason = "stop"
        if reason is not None:
            self._finish(r, reason, text, [token], **extra)
        else:
            self._emit(r, Output(r.id, text, [token], False, None, len(r.prompt), len(r.output), **extra))

    def _finish(self, r: Request, reason: FinishReason, text: str, tokens: list[int] | None = None,
                **logprobs: list[TokenLogprob] | None) -> None:
        r.finished = True
        if 0 <= r.slot < len(self._slots) and self._slots[r.slot] is r:
            self._slots[r.slot] = None
            kept = r.cached_tokens()
            # within entries 0 .. C - 2: not wrapped, and clear of the idle rows' entry C - 1
            self._resident[r.slot] = kept if reason != "error" and len(kept) < self.cache.cache_len else None
        self._emit(r, Output(r.id, text, tokens or [], True, reason, len(r.prompt), len(r.output),
                             **logprobs))

    def _emit(self, r: Request, out: Output) -> None:
        try:
            r.sink(out)
        except Exception:
            log.exception("output sink of request %s failed; cancelling it", r.id)
            if not r.finished:
                self.cancel(r.id)
