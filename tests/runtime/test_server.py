"""The server through the official ``openai`` client, and hostile requests straight over HTTP."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.runtime.conftest import hf_logprobs
from tests.runtime.serving import keep_alive_quartile
from weightship.runtime.engine import Engine, EngineConfig
from weightship.runtime.loader import load_model
from weightship.runtime.middleware import Limits
from weightship.runtime.model import Transformer
from weightship.runtime.runner import BackgroundServer
from weightship.runtime.sampling import SamplingParams
from weightship.runtime.server import ServerState
from weightship.runtime.tokenizer import Tokenizer

NAME = "weightship-tiny"
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def server(tiny_model: Transformer, tokenizer: Tokenizer) -> Iterator[BackgroundServer]:
    state = ServerState(NAME, limits=Limits(max_body_bytes=1 << 20))
    state.attach(Engine(tiny_model, tokenizer, EngineConfig(max_queue=32)), tokenizer)
    with BackgroundServer(state) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed(tiny_hf_dir: Path, tokenizer: Tokenizer) -> Iterator[BackgroundServer]:
    """One slot, one queue place, an API key, a long context: for 401s and a full queue."""
    model, _ = load_model(tiny_hf_dir, device="cpu", dtype="float32", max_batch=1, max_model_len=2048)
    state = ServerState(NAME, api_keys=frozenset({KEY, "another-key"}))
    state.attach(Engine(model, tokenizer, EngineConfig(max_queue=1)), tokenizer)
    with BackgroundServer(state) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model: Transformer, tokenizer: Tokenizer) -> Engine:
    """An engine of its own, stepped here: what the server must answer."""
    return Engine(tiny_model, tokenizer)


def _greedy_text(reference: Engine, tokenizer: Tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer.encode(prompt, bos=True)
    return reference.generate(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                              context=ids).text


# ---- the openai client ------------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_equals_the_engine_and_reports_usage(client: openai.OpenAI, reference: Engine,
                                                        tokenizer: Tokenizer) -> None:
    prompt = "The meaning of life is"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == _greedy_text(reference, tokenizer, prompt, 20)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tokenizer.encode(prompt)) + 1, 20)


def test_streamed_completion_equals_the_whole(client: openai.OpenAI) -> None:
    kw = {"model": NAME, "prompt": "Paris is", "max_tokens": 24, "temperature": 0.0,
          "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(text) > 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


def test_sse_stream_ends_with_done(server: BackgroundServer) -> None:
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_chat_streamed_and_not(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=NAME, messages=messages,  # type: ignore[arg-type]
                                           max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.object == "chat.completion"
    assert whole.usage is not None and whole.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=NAME, messages=messages,  # type: ignore[arg-type]
                                            max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_concurrent_streams_each_get_their_own_text(client: openai.OpenAI, reference: Engine,
                                                    tokenizer: Tokenizer) -> None:
    prompts = [f"Story number {i}: once upon a time" + " and" * i for i in range(6)]
    lengths = [8 + 6 * i for i in range(6)]

    def stream(i: int) -> str:
        chunks = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i],
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(stream, range(6)))
    assert got == [_greedy_text(reference, tokenizer, p, n) for p, n in zip(prompts, lengths, strict=True)]


def test_n_choices_and_seeds(client: openai.OpenAI) -> None:
    kw = {"model": NAME, "prompt": "Once", "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3}
    a = client.completions.create(**kw)  # type: ignore[call-overload]
    b = client.completions.create(**kw)  # type: ignore[call-overload]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # each choice draws with its own seed


def test_stop_sequence(client: openai.OpenAI) -> None:
    full = client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[8:11]
    cut = client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_echo_with_logprobs_scores_prompts_like_transformers(client: openai.OpenAI, tokenizer: Tokenizer,
                                                             hf_model: torch.nn.Module) -> None:
    """lm-evaluation-harness's loglikelihood request: token-id prompts, ``echo``, ``logprobs``,
    one new token; every prompt token after the first is scored as transformers scores it."""
    prompts = [tokenizer.encode(t, bos=True) for t in ("The cat sat on the mat", "Two plus two is four")]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=1, temperature=0, echo=True,
                                  logprobs=1)
    assert [c.index for c in r.choices] == [0, 1]
    for prompt, choice in zip(prompts, r.choices, strict=True):
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        assert lp.tokens is not None and len(lp.tokens) == len(prompt) + 1
        assert lp.tokens[0] == "<s>" and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert choice.text.startswith(tokenizer.decode(prompt))  # echoed in front of the answer
        ref = hf_logprobs(hf_model, prompt)
        got = lp.token_logprobs[1 : len(prompt)]
        want = [ref[p - 1, prompt[p]].item() for p in range(1, len(prompt))]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4  # type: ignore[operator]
        greedy = tokenizer.token_text(int(ref[-1].argmax()))
        assert list(lp.top_logprobs[-1]) == [greedy] and lp.tokens[-1] == greedy
        assert lp.text_offset is not None and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    """Chat's logprobs: one entry per token with its exact bytes and top alternatives; the
    streamed chunks carry the same entries as the whole answer."""
    kw = {"model": NAME, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12,
          "temperature": 0, "logprobs": True, "top_logprobs": 2, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 12 == whole.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
               and e.top_logprobs[0].token == e.token and e.logprob <= 0 for e in content)
    raw = b"".join(bytes(e.bytes or []) for e in content)
    assert raw.decode() == choice.message.content  # the first token without SentencePiece's space
    chunks = list(client.chat.completions.create(stream=True, **kw))  # type: ignore[call-overload]
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or ()]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_logprobs_join_to_a_text_cut_by_a_stop_string(client: openai.OpenAI) -> None:
    """A stop string's tokens are not in the log-probabilities (the engine holds a token's entry
    back with its text while it may begin a stop string): the entries spell the content, whole
    and streamed. A stop string that begins inside a token keeps that token's entry."""
    kw = {"model": NAME, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16,
          "temperature": 0, "logprobs": True, "top_logprobs": 1, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**kw).choices[0]  # type: ignore[call-overload]
    answer, tokens = full.message.content, [e.token for e in full.logprobs.content]
    assert "".join(tokens) == answer and all("\ufffd" not in t for t in tokens[:8]), tokens
    two_tokens = tokens[5] + tokens[6]  # a stop string of whole tokens, and one from inside token 5
    for stop, kept in ((two_tokens, 5), (tokens[5][-2:] + tokens[6], 6)):
        cut = answer.index(stop)
        assert cut == len("".join(tokens[:kept])) - (0 if kept == 5 else 2)
        whole = client.chat.completions.create(stop=[stop], **kw).choices[0]  # type: ignore[call-overload]
        assert (whole.message.content, whole.finish_reason) == (answer[:cut], "stop")
        entries = [e.token for e in whole.logprobs.content]
        assert entries == tokens[:kept]
        chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, stop=[stop], **kw)  # type: ignore[call-overload]
                  if c.choices]
        assert "".join(c.delta.content or "" for c in chunks) == answer[:cut]
        assert [e.token for c in chunks if c.logprobs for e in c.logprobs.content or ()] == entries
    text = client.completions.create(model=NAME, prompt="Hello", max_tokens=16, temperature=0, logprobs=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert text.logprobs is not None and text.logprobs.tokens
    stop = text.logprobs.tokens[4] + text.logprobs.tokens[5]
    cut = text.text.index(stop)
    assert cut == len("".join(text.logprobs.tokens[:4]))
    short = client.completions.create(model=NAME, prompt="Hello", max_tokens=16, temperature=0, logprobs=0,
                                      stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert short.text == text.text[:cut] and short.logprobs is not None
    assert short.logprobs.tokens == text.logprobs.tokens[:4]


def test_streamed_echo_and_logprobs_equal_the_whole(client: openai.OpenAI) -> None:
    kw = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "echo": True,
          "logprobs": 2, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kw).choices[0]  # type: ignore[call-overload]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)  # type: ignore[call-overload]
              if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert whole.text.startswith("Once upon a time")
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [x for c in chunks if c.logprobs for x in getattr(c.logprobs, field)]
        assert streamed == getattr(whole.logprobs, field), field
    # each token's text is where text_offset says (the first word without SentencePiece's space)
    assert whole.logprobs is not None and whole.logprobs.tokens and whole.logprobs.text_offset
    pairs = list(zip(whole.logprobs.tokens, whole.logprobs.text_offset, strict=True))
    assert pairs[:2] == [("<s>", 0), (" Once", 0)]
    for token, at in pairs[2:]:
        if "\ufffd" not in token:  # a whole character (not one byte of one)
            assert whole.text[at : at + len(token)] == token, (token, at)


def test_metrics_count_requests_tokens_and_latency(server: BackgroundServer, client: openai.OpenAI) -> None:
    client.completions.create(model=NAME, prompt="Count me", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['weightship_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert samples["weightship_prompt_tokens_total"] >= 3
    assert samples["weightship_generation_tokens_total"] >= 3
    assert samples["weightship_time_to_first_token_seconds_count"] >= 1
    assert samples["weightship_time_per_output_token_seconds_count"] >= 1
    for gauge in ("weightship_queue_depth", "weightship_running_requests",
                  "weightship_kv_cache_usage_ratio"):
        assert gauge in samples


def test_health_and_ready(server: BackgroundServer) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200


def test_a_kept_alive_connection_answers_without_a_delayed_ack_wait(server: BackgroundServer) -> None:
    """Loose bound (a property of the connection, not of the machine's speed): 40 ms is the
    delayed ACK a Nagle-delayed answer waits for; an answer here takes well under a millisecond."""
    quartile = keep_alive_quartile(server.port)
    assert quartile < 0.020, f"lower quartile {quartile * 1000:.1f} ms per request on a kept-alive connection"


# ---- the abuse battery ------------------------------------------------------------------------

TOO_LONG = "word " * 1000  # > 512 tokens of context
HOSTILE_JSON: list[tuple[str, str, dict | str]] = [
    ("max_tokens 0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    ("max_tokens -1", "/v1/completions", {"prompt": "hi", "max_tokens": -1}),
    ("max_tokens 1.5", "/v1/completions", {"prompt": "hi", "max_tokens": 1.5}),
    ("max_tokens 1e9", "/v1/completions", '{"prompt": "hi", "max_tokens": 1e9}'),
    ("max_tokens 10**9", "/v1/completions", {"prompt": "hi", "max_tokens": 10**9}),
    ("max_tokens string", "/v1/completions", {"prompt": "hi", "max_tokens": "5"}),
    ("prompt [-1]", "/v1/completions", {"prompt": [-1]}),
    ("prompt [vocab]", "/v1/completions", {"prompt": [1, 32000]}),
    ("empty prompt", "/v1/completions", {"prompt": ""}),
    ("empty token list", "/v1/completions", {"prompt": []}),
    ("prompt over the context", "/v1/completions", {"prompt": TOO_LONG, "max_tokens": 1}),
    ("chat over the context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": TOO_LONG}]}),
    ("absurd n", "/v1/completions", {"prompt": "hi", "n": 1000}),
    ("n 0", "/v1/completions", {"prompt": "hi", "n": 0}),
    ("temperature -1", "/v1/completions", {"prompt": "hi", "temperature": -1}),
    ("top_p 0", "/v1/completions", {"prompt": "hi", "top_p": 0}),
    ("no messages", "/v1/chat/completions", {"messages": []}),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}),
    ("not json", "/v1/completions", "{this is not json"),
    ("json array", "/v1/completions", "[1, 2, 3]"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}),
    ("nine stops", "/v1/completions", {"prompt": "hi", "stop": ["a"] * 9}),
    ("logprobs 21", "/v1/completions", {"prompt": "hi", "logprobs": 21}),
    ("logprobs -1", "/v1/completions", {"prompt": "hi", "logprobs": -1}),
    ("chat logprobs 3", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}),
    ("top_logprobs alone", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
    ("top_logprobs 50", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50}),
    ("suffix", "/v1/completions", {"prompt": "def f(", "suffix": "return x"}),
]


@pytest.mark.parametrize(("path", "body"), [(p, b) for _, p, b in HOSTILE_JSON],
                         ids=[name for name, _, _ in HOSTILE_JSON])
def test_hostile_bodies_get_4xx_with_an_openai_error(server: BackgroundServer, path: str,
                                                     body: dict | str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                   timeout=30)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert httpx.get(server.url + "/health").status_code == 200


def _raw_request(port: int, head: bytes, body_chunks: Iterator[bytes]) -> bytes:
    """Send a request over a plain socket, stop sending once the server answers, read the reply."""
    import select

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:
                break  # the server has answered (and will not read the rest)
            try:
                s.sendall(chunk)
            except OSError:
                break
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = s.recv(65536)
            if not data:
                break
            reply += data
        return reply


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_a_declared_100_mb_body_is_refused_unread(server: BackgroundServer) -> None:
    size = 100 << 20
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    reply = _raw_request(server.port, head, (b"x" * (1 << 20) for _ in range(100)))
    assert _status(reply) == 413
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_chunked_100_mb_body_is_cut_off(server: BackgroundServer) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (1 << 16, b"y" * (1 << 16))
    reply = _raw_request(server.port, head, (piece for _ in range(1600)))  # 100 MiB
    assert _status(reply) == 413
    assert httpx.get(server.url + "/health").status_code == 200


def test_300_headers_are_refused(server: BackgroundServer) -> None:
    headers = {f"x-h{i}": "v" for i in range(300)}
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
    assert r.status_code == 431 and "headers" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_5_mb_header_is_refused(server: BackgroundServer) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (5 << 20) + b"\r\n\r\n"
    reply = _raw_request(server.port, head[:4096], (head[i : i + 65536] for i in range(4096, len(head), 65536)))
    assert 400 <= _status(reply) < 500
    assert httpx.get(server.url + "/health").status_code == 200


# ---- API keys and a full queue ------------------------------------------------------------------

SWEEP = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
         ("GET", "/metrics"), ("GET", "/v1/nothing-here"), ("GET", "/"), ("DELETE", "/v1/models")]


@pytest.mark.parametrize(("method", "path"), SWEEP)
def test_every_route_but_health_and_ready_needs_a_key(keyed: BackgroundServer, method: str, path: str) -> None:
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        r = httpx.request(method, keyed.url + path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    good = httpx.request(method, keyed.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert good.status_code != 401


def test_health_and_ready_need_no_key(keyed: BackgroundServer) -> None:
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/ready").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=keyed.url + "/v1", api_key="another-key", max_retries=0)
    assert ok.models.list().data[0].id == NAME


def _metrics(srv: BackgroundServer) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _wait_idle(srv: BackgroundServer) -> dict[str, float]:
    """Poll until nothing runs or waits (bounded, so a leak fails rather than hangs)."""
    for _ in range(600):
        m = _metrics(srv)
        if m["weightship_running_requests"] == 0 and m["weightship_queue_depth"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"the engine never went idle: {m}")


def test_a_full_queue_answers_429_with_retry_after(keyed: BackgroundServer) -> None:
    """One slot and one queue place: a running stream, a waiting one, then a refusal."""
    auth = {"Authorization": f"Bearer {KEY}"}
    before = _wait_idle(keyed)["weightship_generation_tokens_total"]
    long = {"prompt": "a", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=keyed.url, headers=auth, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)  # admitted: it produces tokens
            with http.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200  # queued behind the running one
                m = _metrics(keyed)
                assert (m["weightship_running_requests"], m["weightship_queue_depth"]) == (1, 1)
                refused = http.post("/v1/completions", json={"prompt": "b", "max_tokens": 1})
                assert refused.status_code == 429, refused.text
                assert int(refused.headers["retry-after"]) >= 1
                assert refused.json()["error"]["code"] == "queue_full"
        # both streams were closed early: their requests are cancelled, not run to the end
        generated = _wait_idle(keyed)["weightship_generation_tokens_total"] - before
        assert generated < 4000
        ok = http.post("/v1/completions", json={"prompt": "c", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_client_that_hangs_up_is_cancelled(keyed: BackgroundServer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    before = _wait_idle(keyed)["weightship_generation_tokens_total"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(keyed.url + "/v1/completions", headers=auth, timeout=0.3,
                   json={"prompt": "x", "max_tokens": 2000, "ignore_eos": True})
    assert _wait_idle(keyed)["weightship_generation_tokens_total"] - before < 2000
