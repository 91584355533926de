"""Usage metering through the official ``openai`` client against a real server on loopback: one
record per finished request with exactly the ``usage`` the client was sent, written before the
response's last bytes; per-key Prometheus counters that never name a key; ``/v1/usage`` for
keys of scope "usage" only; a log that a crash cannot garble."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.net import wait_until
from weightship.runtime.engine import Engine, EngineConfig
from weightship.runtime.keys import KeyFile, KeyRing
from weightship.runtime.model import Transformer
from weightship.runtime.runner import BackgroundServer
from weightship.runtime.server import ServerState
from weightship.runtime.tokenizer import Tokenizer
from weightship.runtime.usage import UsageLog, parse_records, read_records

NAME = "weightship-tiny"


class Metered:
    """A server with two inference keys, one usage key and a usage log."""

    def __init__(self, srv: BackgroundServer, keys: KeyFile, secrets: dict[str, str], log: Path):
        self.srv, self.keys, self.secrets, self.log = srv, keys, secrets, log

    def client(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.srv.url + "/v1", api_key=self.secrets[name],
                             max_retries=0, timeout=60)

    def key_id(self, name: str) -> str:
        entry = self.keys.by_name(name)
        assert entry is not None
        return entry.id

    def records(self) -> dict[str, dict[str, Any]]:
        return {r["id"]: r for r in read_records(self.log.parent)}


@pytest.fixture(scope="module")
def metered(tiny_model: Transformer, tokenizer: Tokenizer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    keys = KeyFile("acme")
    secrets = {name: keys.add(name)[1] for name in ("alice", "bob")}
    secrets["operator"] = keys.add("operator", scopes=("usage",))[1]
    log = tmp_path_factory.mktemp("usage") / "weightship-0.jsonl"
    usage_log = UsageLog(log)
    state = ServerState(NAME, keyring=KeyRing(None, keys.keys), usage_log=usage_log)
    state.attach(Engine(tiny_model, tokenizer, EngineConfig(max_queue=32)), tokenizer)
    with BackgroundServer(state) as srv:
        yield Metered(srv, keys, secrets, log)
    usage_log.close()


def test_each_request_is_one_record_with_the_usage_the_client_got(metered: Metered) -> None:
    alice, bob = metered.client("alice"), metered.client("bob")
    raw = alice.completions.with_raw_response.create(model=NAME, prompt="The sky is",
                                                     max_tokens=7, extra_body={"ignore_eos": True})
    completion = raw.parse()
    rid = raw.headers["x-weightship-request-id"]
    record = metered.records()[rid]  # already there when the client has the answer
    assert record["key_id"] == metered.key_id("alice") and record["key_name"] == "alice"
    assert record["status"] == 200 and record["model"] == NAME
    assert record["route"] == "/v1/completions" and record["duration_s"] >= 0
    assert completion.usage is not None
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens) and \
        completion.usage.completion_tokens == 7

    raw_chat = bob.chat.completions.with_raw_response.create(
        model=NAME, messages=[{"role": "user", "content": "Hi there"}], max_tokens=5)
    chat = raw_chat.parse()
    record = metered.records()[raw_chat.headers["x-weightship-request-id"]]
    assert record["key_id"] == metered.key_id("bob") and chat.usage is not None
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        chat.usage.prompt_tokens, chat.usage.completion_tokens)

    # a refused request is a record too, with its status and no tokens
    with pytest.raises(openai.BadRequestError) as refused:
        alice.completions.create(model=NAME, prompt="x", max_tokens=2, n=100)
    record = metered.records()[refused.value.response.headers["x-weightship-request-id"]]
    assert record["status"] == 400 and record["completion_tokens"] == 0


def test_a_streams_record_is_written_before_its_last_chunk(metered: Metered) -> None:
    body = {"model": NAME, "prompt": "Count with me", "max_tokens": 12, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {metered.secrets['bob']}"}
    seen_before_end: dict[str, Any] | None = None
    usage = None
    with httpx.stream("POST", metered.srv.url + "/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        rid = r.headers["x-weightship-request-id"]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["finish_reason"]:
                # the chunk that ends the only choice: the record is on disk already
                seen_before_end = metered.records().get(rid)
            usage = event.get("usage") or usage
    assert seen_before_end is not None, "no record before the stream's end"
    assert usage is not None
    assert (seen_before_end["prompt_tokens"], seen_before_end["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"]) == (usage["prompt_tokens"], 12)


def test_an_abandoned_stream_is_recorded_as_cut_short(metered: Metered, monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_engine(metered, monkeypatch)  # still generating when the client hangs up, however busy the machine
    body = {"model": NAME, "prompt": "A very long story", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {metered.secrets['alice']}"}
    with httpx.stream("POST", metered.srv.url + "/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        rid = r.headers["x-weightship-request-id"]
        next(r.iter_lines())  # then hang up
    wait_until(lambda: rid in metered.records(), 30, "the abandoned stream's record")
    assert metered.records()[rid]["status"] == 499


def _slow_engine(metered: Metered, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The fixture's engine, each step 10 ms slower (a long answer takes seconds)."""
    engine = metered.srv.state.engine
    assert engine is not None
    step = engine.step

    def slow_step() -> bool:
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    return engine


def test_a_whole_answer_whose_client_hung_up_is_recorded_as_cut_short(
        metered: Metered, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not streamed: the client sends its request and hangs up while the answer is generated.
    The generation stops, no answer is made, and the record says 499 (never a 200 with tokens)."""
    engine = _slow_engine(metered, monkeypatch)
    before = set(metered.records())
    body = json.dumps({"model": NAME, "prompt": "A very long story", "max_tokens": 400,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", metered.srv.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + metered.secrets["alice"].encode() +
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: engine.stats().running == 1, 30, "the request to be generating")
    # hung up without reading anything
    wait_until(lambda: set(metered.records()) - before, 30, "the abandoned request's record")
    (record,) = [metered.records()[rid] for rid in set(metered.records()) - before]
    assert record["status"] == 499 and record["key_name"] == "alice"
    assert record["completion_tokens"] < 400
    wait_until(lambda: engine.stats().running == 0, 30, "the generation to stop")


def test_a_stream_that_ends_with_an_engine_error_is_recorded_as_500(
        metered: Metered, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _slow_engine(metered, monkeypatch)
    step, fail = engine.step, threading.Event()

    def failing_step() -> bool:
        if fail.is_set():
            fail.clear()
            raise RuntimeError("simulated device failure")
        return step()

    monkeypatch.setattr(engine, "step", failing_step)
    body = {"model": NAME, "prompt": "Go on", "max_tokens": 300, "stream": True,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {metered.secrets['bob']}"}
    events = []
    with httpx.stream("POST", metered.srv.url + "/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        rid = r.headers["x-weightship-request-id"]
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                fail.set()  # the engine's next step fails
    assert events[-1]["error"]["type"] == "server_error"  # the client was told it failed
    assert metered.records()[rid]["status"] == 500


def test_a_stream_whose_server_fails_after_the_headers_is_recorded_as_500(
        metered: Metered, monkeypatch: pytest.MonkeyPatch) -> None:
    from weightship.runtime import answers

    real, calls = answers.encode_json, [0]

    def failing_after_the_first_chunk(data: Any) -> bytes:
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("simulated bug")
        return real(data)

    monkeypatch.setattr(answers, "encode_json", failing_after_the_first_chunk)
    body = {"model": NAME, "prompt": "Go on", "max_tokens": 20, "stream": True,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {metered.secrets['bob']}"}
    with httpx.stream("POST", metered.srv.url + "/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        rid = r.headers["x-weightship-request-id"]
        with pytest.raises(httpx.RemoteProtocolError):  # the answer is cut short
            for _ in r.iter_lines():
                pass
    wait_until(lambda: rid in metered.records(), 30, "the failed stream's record")
    assert metered.records()[rid]["status"] == 500


def test_metrics_count_per_key_id_and_never_name_a_key(metered: Metered) -> None:
    bob = metered.client("bob")
    before = _counters(metered)
    r = bob.completions.create(model=NAME, prompt="One two", max_tokens=3,
                               extra_body={"ignore_eos": True})
    after = _counters(metered)
    bob_id = metered.key_id("bob")
    assert r.usage is not None
    assert after[("requests", bob_id, "200")] - before.get(("requests", bob_id, "200"), 0) == 1
    assert after[("completion", bob_id, "")] - before.get(("completion", bob_id, "")) == 3
    assert after[("prompt", bob_id, "")] - before.get(("prompt", bob_id, "")) == \
        r.usage.prompt_tokens
    text = httpx.get(metered.srv.url + "/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {metered.secrets['operator']}"}).text
    assert not any(secret in text for secret in metered.secrets.values())


def _counters(metered: Metered) -> dict[tuple[str, str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metered.srv.url + "/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {metered.secrets['alice']}"}).text
    out = {}
    names = {"weightship_key_requests": "requests", "weightship_key_prompt_tokens": "prompt",
             "weightship_key_completion_tokens": "completion"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name in names and sample.name.endswith("_total"):
                out[(names[family.name], sample.labels["key_id"],
                     sample.labels.get("status", ""))] = sample.value
    return out


def test_usage_route_is_for_usage_keys_only(metered: Metered) -> None:
    metered.client("alice").completions.create(model=NAME, prompt="x", max_tokens=1)
    url = metered.srv.url + "/v1/usage"

    def get(headers: dict[str, str]) -> httpx.Response:
        return httpx.get(url, headers=headers, timeout=30)

    assert get({}).status_code == 401
    assert get({"Authorization": f"Bearer {metered.secrets['alice']}"}).status_code == 403
    r = get({"X-Weightship-Key": metered.secrets["operator"]})  # as through the pod proxy
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    served = {json.loads(line)["id"] for line in r.text.splitlines()}
    assert served == set(metered.records())
    # ... only those that finished in [since, until), picked by the server
    times = sorted(r["time"] for r in metered.records().values())
    middle = times[len(times) // 2]
    r = httpx.get(url, params={"since": middle}, timeout=30,
                  headers={"X-Weightship-Key": metered.secrets["operator"]})
    assert r.status_code == 200
    assert sorted(json.loads(line)["time"] for line in r.text.splitlines()) == [
        t for t in times if t >= middle]
    r = httpx.get(url, params={"since": times[0], "until": middle}, timeout=30,
                  headers={"X-Weightship-Key": metered.secrets["operator"]})
    assert sorted(json.loads(line)["time"] for line in r.text.splitlines()) == [
        t for t in times if t < middle]
    r = httpx.get(url, params={"since": "yesterday"}, timeout=30,
                  headers={"X-Weightship-Key": metered.secrets["operator"]})
    assert r.status_code == 400 and "since='yesterday'" in r.json()["error"]["message"]
    # which key file the server loaded: for the operator only
    assert httpx.get(metered.srv.url + "/v1/keys", timeout=30, headers={
        "Authorization": f"Bearer {metered.secrets['alice']}"}).status_code == 403
    assert set(httpx.get(metered.srv.url + "/v1/keys", timeout=30, headers={
        "X-Weightship-Key": metered.secrets["operator"]}).json()) == {"digest", "keys"}
    # the operator's key reads usage and nothing else
    with pytest.raises(openai.PermissionDeniedError):
        metered.client("operator").completions.create(model=NAME, prompt="x", max_tokens=1)


def test_a_line_cut_short_by_a_crash_is_skipped_and_logging_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "usage" / "pod-0.jsonl"
    log = UsageLog(path)
    log.append({"id": "req_1", "n": 1})
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"id": "req_2", "n"')  # the machine went down mid-line
    log = UsageLog(path)
    log.append({"id": "req_3", "n": 3})
    log.sync()
    log.close()
    assert [r["id"] for r in read_records(path.parent)] == ["req_1", "req_3"]
    assert path.read_bytes().count(b"\n") == 3


def test_an_append_never_waits_for_a_slow_fsync(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """append() runs on the event loop: a disk that takes its time to fsync must not hold it
    (nor, through it, every request of the server)."""
    from weightship.runtime import usage

    entered, release, errors = threading.Event(), threading.Event(), []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        release.wait(30)
        try:
            real_fsync(fd)  # still the log's descriptor: close() waited for this flush
        except OSError as e:
            errors.append(e)

    monkeypatch.setattr(usage.os, "fsync", slow_fsync)
    log = UsageLog(tmp_path / "pod-0.jsonl", fsync_every=3600)
    log.append({"id": "req_1"})
    syncing = threading.Thread(target=log.sync)
    syncing.start()
    assert entered.wait(10)
    appending = threading.Thread(target=log.append, args=({"id": "req_2"},))
    appending.start()
    appending.join(10)
    appended_during_the_fsync = not appending.is_alive()
    release.set()
    syncing.join(30)
    appending.join(30)
    assert appended_during_the_fsync, "append waited for the fsync"

    # close() while the flusher is in an fsync: it waits for it, then closes
    entered.clear()
    release.clear()
    log = UsageLog(tmp_path / "pod-1.jsonl", fsync_every=0.01)
    log.append({"id": "req_3"})
    assert entered.wait(10)
    closing = threading.Thread(target=log.close)
    closing.start()
    release.set()
    closing.join(30)
    assert not closing.is_alive() and errors == []
    assert [r["id"] for r in read_records(tmp_path)] == ["req_1", "req_2", "req_3"]


def test_opening_a_long_log_reads_only_its_last_byte(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "pod-0.jsonl"
    with open(path, "wb") as f:  # 256 MiB of history (sparse), cut short at the end
        f.truncate(256 << 20)
        f.seek(0, os.SEEK_END)
        f.write(b'{"id": "req_cut", "n"')
    tracemalloc.start()
    try:
        log = UsageLog(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    log.append({"id": "req_next"})
    log.close()
    assert peak < 1 << 20, f"opening the log allocated {peak} bytes"
    with open(path, "rb") as f:
        f.seek(-22, os.SEEK_END)
        assert f.read() == b'"n"\n{"id":"req_next"}\n'  # the cut line stays a line of its own


@given(st.lists(st.fixed_dictionaries({"id": st.text(max_size=8), "n": st.integers()}),
                max_size=8),
       st.lists(st.integers(0, 400), max_size=6))
def test_records_are_the_same_however_the_text_is_cut_into_pieces(
        records: list[dict[str, Any]], cuts: list[int]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records).encode() + b'{"id": "cut sh'
    at = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]
    assert list(parse_records(pieces)) == list(parse_records([text])) == records
    assert list(parse_records([text.decode()])) == records
