"""A request as the engine holds it, and what the engine gives back for it.

The engine (:mod:`weightship.runtime.engine`) owns the scheduling; a :class:`Request` keeps
one request's own state: its tokens, its place in the cache, the text held back while it may
be the start of a stop string. Each step's result goes to the request's sink as an
:class:`Output`; :meth:`Engine.generate` gathers them into a :class:`Completion`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from weightship.runtime.logprobs import TokenLogprob
from weightship.runtime.sampling import Sampler, SamplingParams
from weightship.runtime.tokenizer import IncrementalDecoder

# Why a request ended: a stop token or string, max_tokens or the context, the client went, the engine failed.
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class Output:
    """What one step produced for one request."""

    request_id: str
    text: str  # new text (may be "" while a character or a possible stop string is held back)
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # When the request asked for them: of the tokens whose text this output releases (a token's
    # entry is held back with its text while that may be the start of a stop string, and dropped
    # if its text begins at or after the stop string).
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # of the prompt, with its first token


OutputSink = Callable[[Output], None]


@dataclass
class Request:
    """A request's state while the engine holds it."""

    id: str
    prompt: list[int]
    params: SamplingParams
    sink: OutputSink
    decoder: IncrementalDecoder | None
    seq: int  # admission order
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    output: list[int] = field(default_factory=list)
    pending_text: str = ""  # held back: it may be the start of a stop string
    # held back with it: each token's entry, with where its text starts in pending_text
    pending_logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    sampler: Sampler | None = None
    finished: bool = False
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # while prefilling (echo)

    @property
    def decoding(self) -> bool:
        return not self.finished and bool(self.output)

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys are in the cache: every token fed, which is the prompt so far
        and the output but its last."""
        return self.prompt[: self.prefilled] + (self.output[:-1] if self.prefilled == len(self.prompt) else [])

    def release(self, text: str, final: bool,
                logprob: TokenLogprob | None = None) -> tuple[str, bool, list[TokenLogprob]]:
        """Of the new ``text`` (the text the token just accepted completes, ``logprob`` its
        entry), what can be released now, whether a stop string was found, and the entries of
        the tokens released with it: a token's entry goes out with the first character of its
        text (or at the end), and never if its text begins at or after a stop string. A token
        whose text a stop string begins inside keeps its entry (its text runs past the cut)."""
        stops = self.params.stop
        if not stops:
            return text, False, [] if logprob is None else [logprob]
        held = self.pending_logprobs + ([] if logprob is None else [(len(self.pending_text), logprob)])
        buf = self.pending_text + text
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.pending_text, self.pending_logprobs = "", []
            return buf[:cut], True, [e for at, e in held if at < cut]
        hold = 0 if final else max(
            (k for s in stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        released = len(buf) - hold
        self.pending_text = buf[released:]
        self.pending_logprobs = [(at - released, e) for at, e in held if at >= released and not final]
        return buf[:released], False, [e for at, e in held if at < released or final]


@dataclass(frozen=True)
class Completion:
    """The whole result of :meth:`Engine.generate`."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
