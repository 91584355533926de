"""The server's steps without HTTP: :func:`start` submits a request's choices, :func:`stream`
and :func:`whole` make the answer, and the error table answers each failure as OpenAI does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightship.errors import EngineOverloadedError, EngineStoppedError, InvalidRequestError, ModelNotServedError
from weightship.runtime.answers import stream
from weightship.runtime.api_errors import error_response
from weightship.runtime.engine import Engine
from weightship.runtime.model import Transformer
from weightship.runtime.protocol import CompletionRequest, encode_json
from weightship.runtime.run import start
from weightship.runtime.sampling import SamplingParams
from weightship.runtime.state import ServerState
from weightship.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def state(tiny_model: Transformer, tokenizer: Tokenizer) -> Iterator[ServerState]:
    state = ServerState("tiny", max_logprobs=1000)
    state.attach(Engine(tiny_model, tokenizer), tokenizer)
    yield state
    assert state.engine is not None
    state.engine.stop()


def _events(chunks: list[bytes]) -> list[Any]:
    return [json.loads(c[6:]) if c != b"data: [DONE]\n\n" else "[DONE]" for c in chunks]


def test_start_and_stream_make_the_answer_the_engine_gives(state: ServerState, tokenizer: Tokenizer) -> None:
    assert state.engine is not None
    ids = tokenizer.encode("Once upon a time", bos=True)
    body = CompletionRequest(prompt="Once upon a time", max_tokens=8, temperature=0, n=2, ignore_eos=True,
                             stream=True, stream_options={"include_usage": True})

    async def answer() -> list[bytes]:
        assert state.engine is not None
        run = start(state, state.engine, body, [ids], contexts=[ids], default_max=16)
        return [chunk async for chunk in stream(run, body, "cmpl-test", None, None)]

    events = _events(asyncio.run(answer()))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 16
    want = state.engine.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                 context=ids).text
    for index in (0, 1):
        assert "".join(e["choices"][0]["text"] for e in events[:-2] if e["choices"][0]["index"] == index) == want


def test_start_refuses_an_answer_over_max_logprobs_before_submitting(state: ServerState) -> None:
    body = CompletionRequest(prompt=[1, 2, 3], max_tokens=100, logprobs=20)  # 100 × 21 > 1000

    async def attempt() -> None:
        assert state.engine is not None
        start(state, state.engine, body, [[1, 2, 3]], contexts=[[1, 2, 3]], default_max=16)

    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(attempt())
    assert caught.value.code == "too_many_logprobs" and "2100" in str(caught.value)
    assert state.engine is not None and state.engine.stats().waiting == 0


@pytest.mark.parametrize(("error", "status", "kind", "param", "code", "retry"), [
    (InvalidRequestError("bad", param="n"), 400, "invalid_request_error", "n", None, None),
    (ModelNotServedError("gpt-4o", "tiny"), 404, "invalid_request_error", "model", "model_not_found", None),
    (EngineOverloadedError(64, retry_after=3), 429, "server_busy", None, "queue_full", "3"),
    (EngineStoppedError("draining"), 503, "server_error", None, None, "1"),
    (ZeroDivisionError("a bug"), 500, "server_error", None, None, None),
])
def test_the_error_table(error: Exception, status: int, kind: str, param: str | None, code: str | None,
                         retry: str | None) -> None:
    response = error_response(error)
    body = json.loads(bytes(response.body))["error"]
    assert (response.status_code, body["type"], body["param"], body["code"]) == (status, kind, param, code)
    assert response.headers.get("retry-after") == retry
    assert ("bug" not in body["message"]) if status == 500 else body["message"] == str(error)


_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | \
    st.floats(allow_nan=False, allow_infinity=False)
_ANSWERS = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=5)
                        | st.dictionaries(st.text() | st.integers(0, 1 << 20), inner, max_size=5), max_leaves=40)


@given(_ANSWERS)
def test_an_answer_is_encoded_as_the_json_module_reads_it(value: Any) -> None:
    """encode_json (orjson, for speed) writes what the json module would: UTF-8 JSON that any
    client parses back to the value, keys that are numbers turned into strings, on one line
    (a server-sent event's data line ends at a newline)."""
    encoded = encode_json(value)
    assert json.loads(encoded) == json.loads(json.dumps(value, ensure_ascii=False))
    assert b"\n" not in encoded
