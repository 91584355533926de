"""The OpenAI API's request bodies (as pydantic models) and error bodies.

Numbers that must be integers are strict: ``max_tokens: 1.5`` or ``1e9`` (a JSON float) is
refused, not truncated. Unknown fields are allowed (clients send ``user``, ``logit_bias``, …)
and ignored. Reference: the OpenAI API reference, "Completions" and "Chat".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from weightship.errors import InvalidRequestError
from weightship.runtime.sampling import MAX_TOP, SamplingParams
from weightship.runtime.tokenizer import ChatMessage


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class CommonParams(BaseModel):
    """Parameters completions and chat share."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = 0  # an extension (vLLM's), not in OpenAI's API
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: StrictBool = False  # an extension, for benchmarks

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
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(CommonParams):
    """``POST /v1/completions``."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool = False  # the prompt in front of the answer (and its logprobs, if asked)
    suffix: StrictStr | None = None
    logprobs: StrictInt | None = None  # log-probabilities with this many alternatives per token

    def token_logprobs(self) -> tuple[int | None, int | None]:
        _check_top(self.logprobs, "logprobs")
        return self.logprobs, self.logprobs if self.echo else None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

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
