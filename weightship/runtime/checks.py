"""The checks a request passes before the engine sees it: the model is loaded and is the one
asked for, no unsupported parameter, a sane number of choices, and prompts that can fit.

Each refusal is an :class:`~weightship.errors.InvalidRequestError` (400) naming the field. Sizes
are checked before any work that grows with them: a prompt's text is measured in characters and
bytes before it is tokenized (``ServerState.max_prompt_bytes``), a list of token ids is counted
before the engine checks each one.
"""

from __future__ import annotations

from typing import cast

from weightship.errors import EngineStoppedError, InvalidRequestError, ModelNotServedError
from weightship.runtime.bodies import BodyLimits
from weightship.runtime.engine import Engine
from weightship.runtime.protocol import CommonParams, CompletionRequest
from weightship.runtime.state import ServerState
from weightship.runtime.tokenizer import Tokenizer

Prompt = str | list[int]


def body_limits(state: ServerState) -> BodyLimits:
    """The sizes a request body is held to; the model must be loaded (they depend on its context)."""
    if not state.ready or state.engine is None:
        raise EngineStoppedError("the model is still loading")
    return BodyLimits(state.max_choices, state.engine.args.max_model_len)


def serving(state: ServerState, body: CommonParams) -> tuple[Engine, Tokenizer]:
    """The engine and tokenizer for ``body``: the model must be loaded and be the one named,
    and the request may ask for nothing the server would ignore."""
    if not state.ready or state.engine is None or state.tokenizer is None:
        raise EngineStoppedError("the model is still loading")
    if body.model is not None and body.model != state.model_name:
        raise ModelNotServedError(body.model, state.model_name)
    body.refuse_unsupported()
    return state.engine, state.tokenizer


def check_choices(state: ServerState, n: int, prompts: int) -> None:
    """Refuse fewer than one or more than ``max_choices`` choices (``n`` × prompts)."""
    if not 1 <= n <= state.max_choices // prompts:
        raise InvalidRequestError(f"n × prompts must be between 1 and {state.max_choices}, got "
                                  f"{n} × {prompts}", param="n")


def utf8_longer_than(texts: list[str], limit: int) -> bool:
    """Whether ``texts`` are more than ``limit`` bytes of UTF-8 together (their length in
    characters decides huge ones without encoding them)."""
    return sum(map(len, texts)) > limit or sum(len(t.encode()) for t in texts) > limit


def check_text_size(state: ServerState, texts: list[str], param: str) -> None:
    """Refuse prompt text that cannot fit in the context whatever its tokens."""
    if utf8_longer_than(texts, state.max_prompt_bytes):
        assert state.engine is not None and state.tokenizer is not None
        raise InvalidRequestError(
            f"the {param} is over {state.max_prompt_bytes} bytes, more than the context "
            f"({state.engine.args.max_model_len} tokens of at most {state.tokenizer.max_token_bytes} "
            "bytes each) can hold", param=param, code="context_length_exceeded")


def completion_prompts(state: ServerState, body: CompletionRequest, context: int) -> list[Prompt]:
    """The prompts of a completions request (a text, a list of token ids, or a list of either),
    each checked for size: a text by :func:`check_text_size`, token ids against ``context``."""
    if body.suffix:
        raise InvalidRequestError("suffix is not supported: the model has no fill-in-the-middle",
                                  param="suffix")
    raw = body.prompt
    one = isinstance(raw, str) or (raw and isinstance(raw[0], int))  # a text, or one prompt's ids
    prompts = cast(list[Prompt], [raw] if one else list(raw))
    if not prompts:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    check_choices(state, body.n, len(prompts))
    for p in prompts:
        if not p:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if isinstance(p, str):
            check_text_size(state, [p], "prompt")
        elif len(p) > context:  # refused here, before the engine checks each of its tokens
            raise InvalidRequestError(f"the prompt ({len(p)} tokens) is longer than the context "
                                      f"({context} tokens)", param="prompt",
                                      code="context_length_exceeded")
    return prompts
