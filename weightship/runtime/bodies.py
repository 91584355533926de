"""Reading an API request's body: JSON parsed within a bound, its long lists counted, then
validated (:mod:`weightship.runtime.protocol`), without holding the event loop for long.

FastAPI would parse a body and pydantic validate it on the event loop before the route runs, and
a 4 MiB body of small items took seconds: 0.7 s for a million one-character prompts (a Python
call per string), 1.3 s for a million ``[1]`` token lists, 0.3 to 0.5 s just to parse a million
``[]`` (the collector walking every list made so far, again and again). A worker thread alone
would not free the loop: the json module's scanner and pydantic-core hold the GIL from start to
end of a call. So the work is bounded before it starts:

1. A body may hold at most :attr:`BodyLimits.max_values` JSON values: the token ids of
   ``max_choices`` prompts of a whole context, and 65,536 more for everything else. The values
   are counted without parsing, from the commas, brackets and colons (those in strings too, an
   over-count only a text of tens of thousands of them notices); a body over the bound is
   refused unparsed. A number or a short string costs the parser 15 to 50 ns, an object's key
   up to 500 ns (a new string, looked up and stored), so a colon counts :data:`KEY_VALUES`
   values, and a body may hold at most :data:`MAX_KEYS` keys whatever the context (token ids
   need none; a parse slows as its keys grow: 3.4 ms for 19,660 distinct ones, 48 ms for
   98,304). The slowest body within the bounds of a 2,048-token context (98,304 values) then
   takes about 10 ms of CPU to parse (4 MiB of 40-character strings).
2. It is parsed with the collector paused: a parse makes no garbage, and a collection in the
   middle of one walks every container made so far.
3. The lists that pydantic validates item by item in Python are counted before it sees them:
   the prompts (at most ``max_choices``, or one prompt's token ids, at most the context), the
   messages (:data:`MAX_MESSAGES`) and their content parts (:data:`MAX_CONTENT_PARTS` in all),
   the stop strings (:data:`MAX_STOP`, as OpenAI) and ``logit_bias`` (:data:`MAX_LOGIT_BIAS`).
4. Only then is it validated.

A body over :data:`OFF_LOOP_BYTES` is read on a worker thread (:func:`read_request`), one at a
time: each of those calls still holds the GIL while it runs, but the loop runs between them,
and the bodies of several requests are no longer read one after another in one turn of the
loop (which ``/health`` would wait out whole). A small body is read on the loop (microseconds,
no thread hop).

Each refusal is a 400 in the OpenAI error shape that names the bound, and the field (``param``)
where there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from weightship.errors import InvalidRequestError
from weightship.runtime.api_errors import invalid_request

MAX_MESSAGES = 4096  # messages in a chat
MAX_CONTENT_PARTS = 4096  # content parts of all a chat's messages together
MAX_STOP = 4  # stop strings (OpenAI's limit)
MAX_LOGIT_BIAS = 1024  # tokens a logit_bias may name
OTHER_VALUES = 1 << 16  # JSON values a body may hold besides its prompts' token ids
KEY_VALUES = 4  # values an object's key counts for
MAX_KEYS = 1 << 15  # object keys a body may hold, whatever the context
OFF_LOOP_BYTES = 64 << 10  # a larger body is read on a worker thread

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class BodyLimits:
    """The sizes a body is held to (see the module docstring)."""

    max_choices: int  # prompts × n
    context: int  # tokens

    @property
    def max_values(self) -> int:
        return self.max_choices * self.context + OTHER_VALUES


async def read_request(request: Request, model: type[Model], limits: BodyLimits) -> Model:
    """The body of ``request`` as a ``model`` request (:func:`read_body`; a large one on a worker thread)."""
    raw = await request.body()
    if len(raw) <= OFF_LOOP_BYTES:
        return read_body(raw, model, limits)
    async with _one_reader():
        return await asyncio.to_thread(read_body, raw, model, limits)


_readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _one_reader() -> asyncio.Semaphore:
    """The running loop's turn to read a large body: one at a time. Reading holds the GIL, so
    two at once are no faster, and the loop would wait on more threads for its own turns."""
    return _readers.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(1))


def read_body(raw: bytes, model: type[Model], limits: BodyLimits) -> Model:
    """``raw`` as a ``model`` request, or an :class:`InvalidRequestError` (see the module docstring)."""
    data = parse_json(raw, limits)
    if isinstance(data, dict):
        check_counts(data, limits)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_request(e.errors(include_url=False)) from None


_gc_lock = threading.Lock()
_gc_pauses = [0, False]  # parses under way; whether the collector was enabled before the first


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The garbage collector off while any parse runs (on the loop or on worker threads)."""
    with _gc_lock:
        if _gc_pauses[0] == 0:
            _gc_pauses[1] = gc.isenabled()
            gc.disable()
        _gc_pauses[0] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses[0] -= 1
            if _gc_pauses[0] == 0 and _gc_pauses[1]:
                gc.enable()


def count_values(raw: bytes, limits: BodyLimits) -> None:
    """Refuse ``raw`` unparsed if it holds more keys or values than any request this server answers
    (a pass over the body for each character counted, the commas before the brackets: a body
    that holds too many is most often refused after two). Each pass is a numpy comparison, which
    lets go of the GIL, and a count: 4 MiB in about 0.7 ms, where ``bytes.count`` held the GIL for
    about 2.5 ms."""
    chars = np.frombuffer(raw, np.uint8)

    def count(char: int) -> int:
        return int(np.count_nonzero(chars == char))

    keys = count(ord(":"))
    if keys > MAX_KEYS:
        raise InvalidRequestError(f"the body holds more than {MAX_KEYS} object keys (counted from its "
                                  f"colons: {keys})", code="too_many_values")
    values = KEY_VALUES * keys + 1
    for char in b",[{":
        values += count(char)
        if values > limits.max_values:
            raise InvalidRequestError(
                f"the body holds more than {limits.max_values} JSON values (counted from its commas, "
                f"brackets and colons, a key as {KEY_VALUES}: at least {values}): more than any "
                "request this server answers can hold", code="too_many_values")


def parse_json(raw: bytes, limits: BodyLimits) -> Any:
    """The JSON value of ``raw``, if it holds at most ``limits.max_values`` values."""
    if len(raw) > min(MAX_KEYS, limits.max_values // KEY_VALUES):  # else it cannot hold too many
        count_values(raw, limits)
    try:
        with _collector_paused():
            return json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"the body is not JSON: {e.msg} (at character {e.pos})") from None
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the body is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except (ValueError, RecursionError) as e:  # a number of over 4,300 digits; nesting too deep
        raise InvalidRequestError(f"the body is not JSON this server reads: {str(e)[:200]}") from None


def _too_many(what: str, limit: int, got: int, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: at most {limit} {what}, got {got}", param=param)


def check_prompt(prompt: list[Any], limits: BodyLimits) -> None:
    """Refuse a ``prompt`` list longer than any this server answers: more than ``max_choices``
    prompts, or one prompt's token ids longer than the context."""
    if len(prompt) <= limits.max_choices:
        return
    if type(prompt[0]) is not int:  # a list of prompts (a mixed list is refused when validated)
        raise _too_many("prompts", limits.max_choices, len(prompt), "prompt")
    if len(prompt) > limits.context:
        raise InvalidRequestError(f"the prompt ({len(prompt)} tokens) is longer than the context "
                                  f"({limits.context} tokens)", param="prompt", code="context_length_exceeded")


def check_counts(data: dict[str, Any], limits: BodyLimits) -> None:
    """Refuse the lists of a parsed body that are too long, before they are validated."""
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        check_prompt(prompt, limits)
    stop = data.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise _too_many("stop strings", MAX_STOP, len(stop), "stop")
    biases = data.get("logit_bias")
    if isinstance(biases, dict) and len(biases) > MAX_LOGIT_BIAS:
        raise _too_many("tokens", MAX_LOGIT_BIAS, len(biases), "logit_bias")
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise _too_many("messages", MAX_MESSAGES, len(messages), "messages")
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_CONTENT_PARTS:
            raise _too_many("content parts in all messages", MAX_CONTENT_PARTS, parts, "messages")
