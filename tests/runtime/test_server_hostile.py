"""The server under hostile clients: huge prompts, amplifying requests, malformed text, and the
OpenAI parameters it does not implement. ``/health`` must keep answering meanwhile (a
liveness probe that times out restarts the pod), and no error may cost a client its
connection.

The server is a real ``weightship serve`` process: the latencies it is held to are its own,
not shared with the test's clients in one interpreter.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.net import free_port, wait_until
from tests.runtime.serving import keep_alive_quartile
from weightship.runtime.engine import Engine
from weightship.runtime.model import Transformer
from weightship.runtime.runner import BackgroundServer
from weightship.runtime.server import ServerState
from weightship.runtime.tokenizer import Tokenizer

NAME = "weightship/tiny-2k"  # a slash, as Hub-style ids have: GET /v1/models/{id} must take it
CONTEXT = 2048
HEALTH_P99 = 0.100  # seconds: the bound issue 17 sets for /health during abuse


MAX_LOGPROBS = 1 << 17  # ServerState.max_logprobs's default, which serve runs with


@dataclass
class Served:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``weightship serve`` with the default limits (a 4 MiB body, max_logprobs), a 2,048-token
    context and 4 slots, on CPU."""
    served = Served(free_port())
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHIP_DEBUG"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "weightship", "serve", str(tiny_hf_dir), "--port", str(served.port),
             "--device", "cpu", "--max-model-len", str(CONTEXT), "--max-batch", "4", "--name", NAME],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: _ready(served.port), 120, "weightship serve to be ready", proc)
        yield served
    finally:
        proc.kill()
        proc.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


class HealthProbe:
    """``GET /health`` every 10 ms, each on a new connection (as a kubelet probes), whether or not
    the ones before have been answered. So a server that stalls for a second is charged for the
    hundred probes it held up, not only for the one that was waiting."""

    def __init__(self, port: int, every: float = 0.010) -> None:
        self.port, self.every = port, every
        self.latencies: list[float] = []
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(32)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _probe(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = time.monotonic()
        try:
            conn.request("GET", "/health")
            self.statuses.add(conn.getresponse().status)
        finally:
            conn.close()
        self.latencies.append(time.monotonic() - sent)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._probe)
            due += self.every
            self._stop.wait(max(0.0, due - time.monotonic()))  # paced, not synchronising

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self._pool.shutdown(wait=True)

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[math.ceil(0.99 * len(ordered)) - 1]


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _send(port: int, path: str, body: bytes) -> Answer:
    """POST ``body`` on a connection of its own (http.client: the test's client side should cost
    the shared interpreter as little as it can, beside the server it measures)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return Answer(r.status, r.read())
    finally:
        conn.close()


def _under_abuse(port: int, attack: Callable[[], Answer], threads: int,
                 min_probes: int = 300) -> list[Answer]:
    """Run ``attack`` on ``threads`` threads at once, again and again until /health has been
    probed ``min_probes`` times meanwhile (once each, if the first round takes that long);
    assert the probe's p99 and return the attack's answers.

    With 300 probes (3 s of abuse), the p99 is the third-slowest probe. A server that is slow
    for 1 % of the time fails; one stall of the whole machine (a 2-core runner's hiccup of
    120 ms makes the probes sent during it 120, 110, 100 … ms) does not. With fewer probes,
    such a hiccup failed a full local run (20 probes: 130 ms) and a CI run (100: 117 ms)."""
    def attacker(probe: HealthProbe) -> list[Answer]:
        answers = [attack()]
        while len(probe.latencies) < min_probes:
            answers.append(attack())
        return answers

    with HealthProbe(port) as probe, ThreadPoolExecutor(threads) as pool:
        answers = [a for batch in pool.map(attacker, [probe] * threads) for a in batch]
    assert probe.statuses == {200}
    assert probe.p99() < HEALTH_P99, f"/health p99 {probe.p99() * 1000:.0f} ms, worst {max(probe.latencies):.2f} s"
    return answers


def _openai_error(r: Answer, status: int) -> dict[str, Any]:
    assert r.status == status, r.body[:500]
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    return error


def test_a_kept_alive_connection_to_serve_answers_without_a_delayed_ack_wait(server: Served) -> None:
    """``weightship serve``'s listening socket is uvicorn's (TCP_NODELAY set on every connection
    it accepts); see tests/runtime/test_server.py for the server the tests run on a thread."""
    quartile = keep_alive_quartile(server.port)
    assert quartile < 0.020, f"lower quartile {quartile * 1000:.1f} ms per request on a kept-alive connection"


# ---- item 9: prompts far longer than the context ------------------------------------------------


def test_4_mib_prompts_are_refused_untokenized_while_health_answers(server: Served) -> None:
    text = "hello world " * ((4 << 20) // 12 - 64)  # 4 MiB less room for the JSON around it
    bodies = [json.dumps({"prompt": text, "max_tokens": 1}).encode(),
              json.dumps({"messages": [{"role": "user", "content": text}]}).encode()]
    paths = ["/v1/completions", "/v1/chat/completions"]
    assert all(len(b) <= 4 << 20 for b in bodies)  # under the body limit: the prompt's own size counts

    sent = itertools.count()

    def attack() -> Answer:  # completions and chat, by turns
        i = next(sent)
        return _send(server.port, paths[i % 2], bodies[i % 2])

    for r in _under_abuse(server.port, attack, threads=3):  # three at once, as the run
        error = _openai_error(r, 400)
        assert error["code"] == "context_length_exceeded" and error["param"] in ("prompt", "messages")


def _listing(head: str, item: str, tail: str, size: int) -> bytes:
    """``head`` + ``item`` repeated (comma-separated) + ``tail``, about ``size`` bytes."""
    return (head + ",".join([item] * (size // (len(item) + 1))) + tail).encode()


def _keys(head: str, tail: str, n: int) -> bytes:
    """``head`` + ``n`` distinct keys (``"0":1,"1":1,…``, the slowest object members to parse) + ``tail``."""
    return (head + ",".join(f'"{i}":1' for i in range(n)) + tail).encode()


BUDGET = 16 * CONTEXT + (1 << 16)  # JSON values a body may hold (max_choices × context + 65,536)
_4_MIB, _UNDER_BUDGET = (4 << 20) - 256, BUDGET - 8_000  # bytes; items, for the bodies below
# Bodies that are small to send and slow to validate item by item (a Python call, a model
# instance, an error collected per item): 4 MiB ones, refused unparsed for the values or keys they hold,
# and ones just under that bound, refused for the count of the list before it is validated.
VALIDATION_ATTACKS: list[tuple[str, str, bytes, str | None]] = [
    ("prompt strings, 4 MiB", "/v1/completions", _listing('{"prompt": [', '"a"', '], "max_tokens": 1}', _4_MIB), None),
    ("content parts, 4 MiB", "/v1/chat/completions",
     _listing('{"messages": [{"role": "user", "content": [', '{"type":"text","text":"a"}', ']}]}', _4_MIB), None),
    ("stop strings, 4 MiB", "/v1/completions", _listing('{"prompt": "hi", "stop": [', '"a"', "]}", _4_MIB), None),
    ("token lists, 4 MiB", "/v1/completions", _listing('{"prompt": [', "[1]", "]}", _4_MIB), None),
    ("an unknown field of lists, 4 MiB", "/v1/completions",
     _listing('{"prompt": "hi", "user": [', "[]", "]}", _4_MIB), None),
    ("prompt strings, under the bound", "/v1/completions",
     _listing('{"prompt": [', '"a"', "]}", 4 * _UNDER_BUDGET), "prompt"),
    ("content parts, under the bound", "/v1/chat/completions",
     _listing('{"messages": [{"role": "user", "content": [', '{"type":"text","text":"a"}', "]}]}",
              27 * _UNDER_BUDGET // 11), "messages"),  # 11 values a part: "{", 2 commas, 2 keys of 4
    ("stop strings, under the bound", "/v1/completions",
     _listing('{"prompt": "hi", "stop": [', '"a"', "]}", 4 * _UNDER_BUDGET), "stop"),
    ("token lists, under the bound", "/v1/completions", _listing('{"prompt": [', "[1]", "]}", 4 * _UNDER_BUDGET // 2),
     "prompt"),
    ("distinct keys, 4 MiB", "/v1/completions", _keys('{"prompt": "hi", "user": {', "}}", _4_MIB // 11), None),
    ("logit_bias, under the bound", "/v1/completions",  # 5 values a key: its colon (4) and comma
     _keys('{"prompt": "hi", "logit_bias": {', "}}", _UNDER_BUDGET // 5), "logit_bias"),
]


@pytest.mark.parametrize(("path", "body", "param"), [(p, b, q) for _, p, b, q in VALIDATION_ATTACKS],
                         ids=[name for name, *_ in VALIDATION_ATTACKS])
def test_bodies_slow_to_validate_are_refused_while_health_answers(server: Served, path: str, body: bytes,
                                                                  param: str | None) -> None:
    """Before, FastAPI parsed and pydantic validated such a body on the event loop: 4 MiB of
    one-character prompts took 0.7 s each, three at once held /health for seconds."""
    assert len(body) <= 4 << 20
    for r in _under_abuse(server.port, lambda: _send(server.port, path, body), threads=3):
        assert _openai_error(r, 400)["param"] == param, r.body[:300]


# ---- item 10: a small request that asks for a huge answer ----------------------------------------


def _prompt_of(tokenizer: Tokenizer, tokens: int) -> str:
    """A text of exactly ``tokens`` tokens with <s>."""
    text = " ".join(["word"] * (tokens - 1))
    assert len(tokenizer.encode(text, bos=True)) == tokens
    return text


def test_an_amplifying_logprobs_request_is_refused_while_health_answers(server: Served,
                                                                        tokenizer: Tokenizer) -> None:
    """Issue 17's request: 11 KB asking for echo, logprobs=20 and n=16 on 2,041 prompt tokens,
    686,000 log-probabilities (19 MB of JSON)."""
    body = json.dumps({"prompt": _prompt_of(tokenizer, 2041), "echo": True, "logprobs": 20, "n": 16,
                       "max_tokens": 1}).encode()
    assert len(body) < 16_000

    def attack() -> Answer:
        return _send(server.port, "/v1/completions", body)

    for r in _under_abuse(server.port, attack, threads=3):
        error = _openai_error(r, 400)
        assert error["code"] == "too_many_logprobs" and error["param"] == "logprobs"
        assert str(MAX_LOGPROBS) in error["message"]


def test_the_largest_logprobs_answer_allowed_is_built_while_health_answers(server: Served,
                                                                           tokenizer: Tokenizer) -> None:
    """Just under max_logprobs (4 choices × 1,560 tokens × 21 log-probabilities): megabytes of
    JSON, built off the event loop."""
    per_token = 4 * 21
    prompt_tokens = MAX_LOGPROBS // per_token - 1
    assert MAX_LOGPROBS - per_token < (prompt_tokens + 1) * per_token <= MAX_LOGPROBS
    body = json.dumps({"prompt": _prompt_of(tokenizer, prompt_tokens), "echo": True, "logprobs": 20,
                       "n": 4, "max_tokens": 1, "temperature": 0}).encode()

    def attack() -> Answer:
        return _send(server.port, "/v1/completions", body)

    r = _under_abuse(server.port, attack, threads=1)[0]
    assert r.status == 200, r.body[:500]
    assert len(r.body) > 2_000_000
    choices = r.json()["choices"]
    assert len(choices) == 4
    for choice in choices:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["top_logprobs"]) == prompt_tokens + 1
        assert all(len(top) == 20 for top in lp["top_logprobs"][1:])
    assert ServerState.max_logprobs == MAX_LOGPROBS


# ---- item 15: text that is not text, and connections that survive errors -------------------------


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


OK_CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()


def test_a_lone_surrogate_is_a_400_and_the_connection_lives_on(server: Served) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    ok = OK_CHAT
    try:
        status, _ = _post(conn, "/v1/chat/completions", ok)
        assert status == 200
        sock = conn.sock
        hostile = [
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages"),
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", '
                                     b'"text": "\\udfff"}]}]}', 400, "messages"),
            ("/v1/completions", b'{"prompt": "\\ud83d", "max_tokens": 1}', 400, "prompt"),
            ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"]}', 400, "stop"),
            ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', 400, "logit_bias"),
            ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),  # not UTF-8 at all
            ("/v1/completions", b'{"prompt": "hi", "model": "nope"}', 404, "model"),
            ("/v1/nothing", b"{}", 404, None),
        ]
        for path, body, want, param in hostile:
            status, answer = _post(conn, path, body)
            assert status == want, (body, answer)
            assert answer["error"]["message"] and answer["error"]["type"], answer
            assert answer["error"]["param"] == param, (body, answer)
            assert conn.sock is sock, f"the connection was closed after {body!r}"
            status, _ = _post(conn, "/v1/chat/completions", ok)
            assert status == 200 and conn.sock is sock
    finally:
        conn.close()


NOT_JSON = [
    ("not JSON", b"{this is not json"),
    ("nested 5,000 deep", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("a 5,000-digit number", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"),
]


@pytest.mark.parametrize("body", [b for _, b in NOT_JSON], ids=[name for name, _ in NOT_JSON])
def test_a_body_that_is_not_json_is_a_400_that_says_so(server: Served, body: bytes) -> None:
    """Before, a body json.loads could not read for depth or digits got FastAPI's "There was an
    error parsing the body"."""
    error = _openai_error(_send(server.port, "/v1/completions", body), 400)
    assert error["message"].startswith("the body is not JSON"), error
    assert error["param"] is None


def test_a_500_keeps_the_connection(tiny_model: Transformer, tokenizer: Tokenizer,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal failure (a bug, simulated in a server of the test's own): a 500 in the OpenAI
    shape, and the client's connection carries the next request."""
    state = ServerState(NAME)
    state.attach(Engine(tiny_model, tokenizer), tokenizer)
    with BackgroundServer(state) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        try:
            assert _post(conn, "/v1/chat/completions", OK_CHAT)[0] == 200
            sock = conn.sock

            def fail(*_: object) -> list[int]:
                raise RuntimeError("simulated bug")

            monkeypatch.setattr(tokenizer, "encode_chat", fail)
            status, answer = _post(conn, "/v1/chat/completions", OK_CHAT)
            assert status == 500 and answer["error"]["type"] == "server_error"
            assert conn.sock is sock
            monkeypatch.undo()
            assert _post(conn, "/v1/chat/completions", OK_CHAT)[0] == 200 and conn.sock is sock
        finally:
            conn.close()


# ---- item 16: parameters the server does not implement, and GET /v1/models/{id} -------------------

CHAT = [{"role": "user", "content": "Name a colour."}]
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}),
    ("tool_choice", {"tool_choice": "required"}),
    ("tool_choice", {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("functions", {"functions": [{"name": "get_weather", "parameters": {}}]}),
    ("function_call", {"function_call": "auto"}),
    ("modalities", {"modalities": ["text", "audio"]}),
]


@pytest.mark.parametrize(("param", "extra"), REFUSED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(REFUSED)])
def test_unsupported_parameters_are_refused_naming_them(client: openai.OpenAI, param: str,
                                                       extra: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4,  # type: ignore[arg-type]
                                       extra_body=extra)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert param in error["message"]


def test_best_of_is_refused_on_completions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="Hello", max_tokens=4, best_of=3)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "best_of"


def test_parameters_that_ask_for_nothing_are_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4,  # type: ignore[arg-type]
                                       response_format={"type": "text"}, tools=[], tool_choice="none",
                                       logit_bias={})
    assert r.choices[0].message.content


def test_logit_bias_steers_the_choice(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    kw: dict[str, Any] = {"model": NAME, "prompt": "The colour of the sky is", "max_tokens": 6,
                          "temperature": 0, "logprobs": 0, "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**kw).choices[0].logprobs
    banana = tokenizer.encode("banana")[-1]  # a token the greedy answer does not hold
    assert plain is not None and plain.tokens and tokenizer.token_text(banana) not in plain.tokens
    forced = client.completions.create(logit_bias={str(banana): 100}, **kw).choices[0].logprobs
    assert forced is not None and forced.tokens == [tokenizer.token_text(banana)] * 6
    first = tokenizer.sp.piece_to_id(plain.tokens[0].replace(" ", "\u2581"))  # ban the greedy first token
    assert tokenizer.token_text(first) == plain.tokens[0]
    banned = client.completions.create(logit_bias={str(first): -100}, **kw).choices[0].logprobs
    assert banned is not None and banned.tokens and banned.tokens[0] != plain.tokens[0]
    for bad in ({"banana": 1}, {"32000": 1}, {"5": 101}, {"-1": 1}, {"9" * 5000: 1},
                {str(t): -1 for t in range(2000)}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(logit_bias=bad, **kw)
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "logit_bias", bad


def test_models_retrieve_answers_the_served_model(client: openai.OpenAI) -> None:
    model = client.models.retrieve(NAME)
    assert (model.id, model.object, model.owned_by) == (NAME, "model", "weightship")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found" and "gpt-4o" in error["message"]


# ---- item 17: chat log-probabilities spell the content ----------------------------------------------


def test_chat_logprobs_join_to_the_content(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": NAME, "messages": CHAT, "max_tokens": 16, "temperature": 0,
                          "logprobs": True, "top_logprobs": 2, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.logprobs is not None and whole.logprobs.content
    content = whole.logprobs.content
    assert whole.message.content and not whole.message.content.startswith(" ")
    assert b"".join(bytes(e.bytes or []) for e in content) == whole.message.content.encode()
    if not any("\ufffd" in e.token for e in content):  # no byte-fallback halves of a character
        assert "".join(e.token for e in content) == whole.message.content
    assert content[0].top_logprobs[0].token == content[0].token  # greedy: the first alternative
    streamed = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.delta.content or "" for c in streamed) == whole.message.content
    assert [e.token for c in streamed if c.logprobs for e in c.logprobs.content or ()] == [e.token for e in content]


def test_an_answer_ended_by_eos_has_no_logprob_entry_for_it(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8,  # type: ignore[arg-type]
                                       logprobs=True, logit_bias={str(tokenizer.eos_id): 100})
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == ""
    assert choice.logprobs is not None and choice.logprobs.content == []
