"""The OpenAI API's request bodies (as pydantic models), error bodies, and the JSON of large
response bodies.

Numbers that must be integers are strict: ``max_tokens: 1.5`` or ``1e9`` (a JSON float) is
refused, not truncated. Every string must be text: JSON can spell a lone UTF-16 surrogate
(``"\\ud800"``), which no UTF-8 text holds, and such a request is refused like any other
malformed one. Unknown fields are allowed (clients send ``user``, ``store``, …) and ignored,
but the OpenAI parameters that change what an answer must be (``response_format``, ``tools``,
``tool_choice``, …) are refused, naming the field, unless they ask for nothing
(``{"type": "text"}``, ``[]``, ``"none"``): an answer that ignored them would quietly break
the client's contract. ``logit_bias`` is supported. Reference: the OpenAI API reference,
"Completions" and "Chat".

The server validates a body only once its size and its long lists have been checked
(:mod:`weightship.runtime.bodies`): these models hold no limit of that kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
)

from weightship.errors import InvalidRequestError
from weightship.runtime.sampling import MAX_TOP, SamplingParams
from weightship.runtime.tokenizer import ChatMessage


def _text(s: str) -> str:
    if not s.isascii():
        try:
            s.encode()
        except UnicodeEncodeError as e:
            raise ValueError(f"holds a lone UTF-16 surrogate ({s[e.start]!a}) at character {e.start}, "
                             "which is not text") from None
    return s


Text = Annotated[str, Strict(), AfterValidator(_text)]


def _nothing(value: Any) -> bool:
    return not value


# The parameters this server does not implement: each with the values that ask for nothing,
# and why any other value is refused.
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        'answers are free text; only {"type": "text"} is accepted'),
    "tools": (_nothing, "the model is served without tool calling"),
    "functions": (_nothing, "the model is served without tool calling"),
    "tool_choice": (lambda v: v in (None, "none"), 'no tool can be called; only "none" is accepted'),
    "function_call": (lambda v: v in (None, "none"), 'no tool can be called; only "none" is accepted'),
    "modalities": (lambda v: v in (None, ["text"]), 'answers are text; only ["text"] is accepted'),
    "audio": (lambda v: v is None, "answers are text"),
    "best_of": (lambda v: v in (None, 1), "each choice is sampled once; use n for more choices"),
}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class CommonParams(BaseModel):
    """Parameters completions and chat share."""

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    max_tokens: StrictInt | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = 0  # an extension (vLLM's), not in OpenAI's API
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: StrictBool = False  # an extension, for benchmarks
    logit_bias: dict[Text, float] | None = None  # token id (a decimal string) → bias

    unsupported: ClassVar[tuple[str, ...]] = ("response_format", "tools", "functions", "tool_choice",
                                              "function_call", "modalities", "audio")

    def refuse_unsupported(self) -> None:
        """Refuse (400, naming the field) a parameter this server would otherwise ignore."""
        extra = self.model_extra or {}
        for name in self.unsupported:
            accepts, why = _UNSUPPORTED[name]
            if not accepts(extra.get(name)):
                raise InvalidRequestError(f"{name} is not supported: {why}", param=name,
                                          code="unsupported_parameter")

    def token_logprobs(self) -> tuple[int | None, int | None]:
        """Alternatives wanted per generated token and per prompt token (None: no logprobs)."""
        return None, None

    def sampling(self, max_tokens: int, index: int = 0) -> SamplingParams:
        """The engine's parameters for choice ``index`` (seeds differ per choice)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        seed = None if self.seed is None else self.seed + index
        logprobs, prompt_logprobs = self.token_logprobs()
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=seed, stop=stop,
                              presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos,
                              logit_bias=self._logit_bias(), logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        out = []
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key[:20]!a}",
                                          param="logit_bias")
            out.append((int(key), bias))
        return tuple(out)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(CommonParams):
    """``POST /v1/completions``."""

    prompt: Text | list[StrictInt] | list[Text] | list[list[StrictInt]]
    echo: StrictBool = False  # the prompt in front of the answer (and its logprobs, if asked)
    suffix: Text | None = None
    logprobs: StrictInt | None = None  # log-probabilities with this many alternatives per token

    unsupported: ClassVar[tuple[str, ...]] = (*CommonParams.unsupported, "best_of")

    def token_logprobs(self) -> tuple[int | None, int | None]:
        _check_top(self.logprobs, "logprobs")
        return self.logprobs, self.logprobs if self.echo else None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Text
    content: Text | list[TextPart] | None = None

    def to_chat(self) -> ChatMessage:
        if self.content is None:
            raise InvalidRequestError(f"a {self.role} message has no content", param="messages")
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(self.role, text)


class ChatCompletionRequest(CommonParams):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None  # alternatives per token, with logprobs

    def token_logprobs(self) -> tuple[int | None, int | None]:
        _check_top(self.top_logprobs, "top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, None


def _check_top(n: int | None, param: str) -> None:
    if n is not None and not 0 <= n <= MAX_TOP:
        raise InvalidRequestError(f"{param} must be from 0 to {MAX_TOP}, got {n}", param=param)


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error response body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def encode_json(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON, by orjson: a 4 MB answer of 130,000 log-probabilities in
    5 to 8 ms of one call, where the json module took 90 ms. Either holds the GIL while it runs,
    and the json module's 90 ms, even cut into pieces of a few milliseconds on a worker thread,
    kept /health waiting for the GIL at every turn of the event loop (a probe p99 of 100-150 ms
    on two cores). Keys that are not strings are written as strings, as the json module does;
    orjson writes a non-finite float as null (log-probabilities are floored at -9999, as
    OpenAI's)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
