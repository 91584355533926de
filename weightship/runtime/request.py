"""A request as the engine holds it, and what the engine gives back for it.

The engine (:mod:`weightship.runtime.engine`) owns the scheduling; a :class:`Request` keeps
one request's own state: its tokens, its place in the cache, the text held back while it may
be the start of a stop string. Each step's result goes to the request's sink as an
:class:`Output`; :meth:`Engine.generate` gathers them into a :class:`Completion`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from weightship.runtime.logprobs import TokenLogprob
from weightship.runtime.sampling import Sampler, SamplingParams
from weightship.runtime.tokenizer import IncrementalDecoder


@dataclass
class Output:
    """What one step produced for one request."""

    request_id: str
    text: str  # new text (may be "" while a character or a possible stop string is held back)
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # of the prompt, with its first token


Sink = Callable[[Output], None]


@dataclass
class Request:
    """A request's state while the engine holds it."""

    id: str
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    decoder: IncrementalDecoder | None
    seq: int  # admission order
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    output: list[int] = field(default_factory=list)
    pending_text: str = ""  # held back: it may be the start of a stop string
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

    def release(self, text: str, final: bool) -> tuple[str, bool]:
        """Of the new ``text``, what can be released now, and whether a stop string was found."""
        stops = self.params.stop
        if not stops:
            return text, False
        buf = self.pending_text + text
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            self.pending_text = ""
            return buf[: min(hits)], True
        hold = 0 if final else max(
            (k for s in stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.pending_text = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False


@dataclass(frozen=True)
class Completion:
    """The whole result of :meth:`Engine.generate`."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
