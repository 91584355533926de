"""``weightship instance usage`` against a real ``weightship serve`` behind the fake API server's
pod proxy: over 200 requests over three keys, the server stopped with SIGTERM while streams run
and killed with ``kill -9`` while others do: every answer a client received whole is in the log
with the usage it was told, and the per-key sums equal what the clients were told (plus what
the server counted of the streams the kill cut short)."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fakekube import FakeKube
from instance_helpers import TINY, run_ok, secret_text, seed_server_pod, the

from tests.net import free_port, wait_until
from tests.runtime.serving import start
from weightship.runtime.keys import load_key_file
from weightship.runtime.runner import BackgroundServer
from weightship.runtime.server import ServerState
from weightship.runtime.usage import UsageLog, parse_records

NAME = "weightship-tiny"


class Clients:
    """Requests of three keys, and what each answer told its client: by request id
    (``x-weightship-request-id``), the key and the ``usage`` of every answer received whole,
    the refused ones, and the streams a killed server cut short."""

    def __init__(self, url: str, keys: dict[str, str]) -> None:
        self.keys = keys
        self.clients = {name: openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                                            timeout=120) for name, key in keys.items()}
        self.received: dict[str, tuple[str, int, int]] = {}  # rid -> key, prompt, completion
        self.refused: dict[str, str] = {}  # rid -> key
        self.cut: set[str] = set()
        self.lock = threading.Lock()

    def got(self, rid: str, key: str, usage: Any) -> None:
        assert usage is not None
        with self.lock:
            self.received[rid] = (key, usage.prompt_tokens, usage.completion_tokens)

    def stream(self, key: str, **body: Any) -> None:
        """A streamed completion, whose request id is known from its headers even when the
        stream is cut short (then recorded in ``cut`` and re-raised)."""
        rid = None
        try:
            with self.clients[key].completions.with_streaming_response.create(
                    model=NAME, stream=True, stream_options={"include_usage": True},
                    **body) as response:
                rid = response.headers["x-weightship-request-id"]
                usage = None
                for chunk in response.parse():
                    usage = chunk.usage or usage
        except (openai.APIError, httpx.HTTPError):
            if rid is not None:
                with self.lock:
                    self.cut.add(rid)
            raise
        self.got(rid, key, usage)

    def one(self, i: int) -> None:
        key = list(self.keys)[i % 3]
        client = self.clients[key]
        if i % 23 == 0:
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model=NAME, prompt="x", max_tokens=1, n=100)
            with self.lock:
                self.refused[refused.value.response.headers["x-weightship-request-id"]] = key
        elif i % 4 == 0:
            self.stream(key, prompt=f"Question {i}?", max_tokens=3 + i % 5)
        else:
            raw = client.completions.with_raw_response.create(
                model=NAME, prompt=f"Item {i} of the list is", max_tokens=2 + i % 7)
            self.got(raw.headers["x-weightship-request-id"], key, raw.parse().usage)

    def many(self, indexes: range) -> None:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(self.one, indexes))

    def until_killed(self, worker: int, stop: threading.Event) -> None:
        """Streams, one after another, until the server goes away under one of them."""
        key = list(self.keys)[worker % 3]
        while not stop.is_set():
            try:
                self.stream(key, prompt=f"Worker {worker} goes on", max_tokens=4 + worker,
                            extra_body={"ignore_eos": True})
            except (openai.APIError, httpx.HTTPError):
                return


def test_usage_sums_equal_the_usage_clients_were_told_across_restarts(
        two_pools: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str], tiny_hf_dir: Path,
        tmp_path: Path) -> None:
    port = free_port()
    run_ok(cli, capsys, "create", "acme", *TINY, "--gpus", "0", "--set", f"serve.port={port}")
    keys = {name: run_ok(cli, capsys, "keys", "add", "acme", "--key-name", name, "--json")["key"]
            for name in ("alice", "bob", "carol")}
    # what the kubelet mounts from the instance's Secret: the hashed key file
    key_file = tmp_path / "keys.json"
    key_file.write_text(base64.b64decode(the(two_pools, "v1", "Secret", "wsi-acme",
                                             "weightship-api-keys")["data"]["keys.json"]).decode())
    # two replicas that read the same usage directory (as with storage.mode=sharedPVC): every
    # record comes back twice, and must be counted once
    seed_server_pod(two_pools, "acme", "weightship-0", port)
    seed_server_pod(two_pools, "acme", "weightship-1", port)
    log = tmp_path / "usage" / "weightship-0.jsonl"
    serve = ("--api-key-file", key_file, "--usage-log", log)
    url = f"http://127.0.0.1:{port}"
    clients = Clients(url, keys)

    proc = start(tiny_hf_dir, port, *serve)
    try:
        clients.many(range(0, 60))
        # SIGTERM while eight streams run: they finish (drain), and are counted once
        started = threading.Barrier(9)

        def drained(i: int) -> None:
            key = list(keys)[i % 3]
            with clients.clients[key].completions.with_streaming_response.create(
                    model=NAME, prompt="Drain me", max_tokens=40, stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True}) as response:
                usage = None
                for n, chunk in enumerate(response.parse()):
                    if n == 0:
                        started.wait(60)
                    usage = chunk.usage or usage
            assert usage is not None and usage.completion_tokens == 40
            clients.got(response.headers["x-weightship-request-id"], key, usage)

        streams = [threading.Thread(target=drained, args=(i,)) for i in range(8)]
        for t in streams:
            t.start()
        started.wait(60)
        proc.send_signal(signal.SIGTERM)
        for t in streams:
            t.join(120)
        assert proc.wait(60) == 0
        assert len(clients.received) + len(clients.refused) == 68

        # kill -9 while six clients stream, one stream after another: no chance to flush
        proc = start(tiny_hf_dir, port, *serve)
        clients.many(range(60, 100))
        before, stop = len(clients.received), threading.Event()
        workers = [threading.Thread(target=clients.until_killed, args=(w, stop)) for w in range(6)]
        for t in workers:
            t.start()
        wait_until(lambda: len(clients.received) >= before + 30, 120, "streams to complete")
        proc.kill()
        proc.wait(30)
        stop.set()
        for t in workers:
            t.join(60)
        assert clients.cut, "no stream was running when the server was killed"

        proc = start(tiny_hf_dir, port, *serve)
        clients.many(range(130, 192))
    finally:
        code, out, err = cli("instance", "usage", "acme", "--by", "key", "--json", capsys=capsys)
        by_day = cli("instance", "usage", "acme", "--by", "day", "--json", capsys=capsys)
        csv_out = cli("instance", "usage", "acme", "--csv", capsys=capsys)
        proc.kill()
        proc.wait(30)
    assert code == 0, err
    assert "not read" not in err
    logged = list(parse_records([log.read_bytes()]))
    records = {r["id"]: r for r in logged}
    assert len(records) == len(logged)  # nothing twice
    # every answer a client received whole is in the log, with the usage it was told
    for rid, (key, prompt, completion) in clients.received.items():
        r = records.get(rid)
        assert r is not None, f"{rid} was answered but is not in the log"
        assert (r["key_name"], r["status"], r["prompt_tokens"], r["completion_tokens"]) == (
            key, 200, prompt, completion)
    assert all(records[rid]["status"] == 400 for rid in clients.refused)
    # and nothing else: a stream the kill cut short may be in it (its record is written before
    # its last chunk), never a request nobody made
    assert set(records) - set(clients.received) - set(clients.refused) <= clients.cut
    assert len(clients.received) + len(clients.refused) >= 200

    told: Counter[tuple[str, str]] = Counter()
    for key, prompt, completion in clients.received.values():
        told.update({(key, "requests"): 1, (key, "prompt_tokens"): prompt,
                     (key, "completion_tokens"): completion})
    for key in clients.refused.values():
        told[(key, "errors")] += 1
    for rid in clients.cut & set(records):  # counted by the server, cut short for the client
        r = records[rid]
        if r["status"] == 200:
            told.update({(r["key_name"], "requests"): 1,
                         (r["key_name"], "prompt_tokens"): r["prompt_tokens"],
                         (r["key_name"], "completion_tokens"): r["completion_tokens"]})
        else:
            told[(r["key_name"], "errors")] += 1
    rows = json.loads(out)
    assert [r["key_name"] for r in rows] == ["alice", "bob", "carol"]
    for row in rows:
        assert set(row) == {"key_name", "key_id", "requests", "prompt_tokens",
                            "completion_tokens", "errors"}
        for field in ("requests", "prompt_tokens", "completion_tokens", "errors"):
            assert row[field] == told[(row["key_name"], field)], (row, field)
    assert by_day[0] == 0
    (day,) = json.loads(by_day[1])
    assert day["requests"] == sum(r["requests"] for r in rows)
    assert day["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert csv_out[0] == 0 and csv_out[1].splitlines()[0] == \
        "key_name,key_id,requests,prompt_tokens,completion_tokens,errors"


def _server_pod_with_claim(fake: FakeKube, name: str, port: int, claim: str,
                           phase: str = "Running") -> None:
    seed_server_pod(fake, "acme", name, port)
    fake.store.patch(fake.store.kind("", "v1", "pods"), "wsi-acme", name,
                     "application/merge-patch+json",
                     {"spec": {"volumes": [{"name": "models",
                                            "persistentVolumeClaim": {"claimName": claim}}]}})
    if phase != "Running":
        fake.store.stalled_kinds.add("Pod")  # the kubelet has not started it
        fake.store.patch(fake.store.kind("", "v1", "pods"), "wsi-acme", name,
                         "application/merge-patch+json",
                         {"status": {"phase": phase, "conditions": []}}, status_only=True)


def _log_server(stack: contextlib.ExitStack, fake: FakeKube, tmp_path: Path) -> tuple[str, str]:
    """A server (no model needed) with the instance's key file and a usage log holding one
    request of key "ci" on 2026-05-01 and two on 2026-05-02; (its port, ci's key id)."""
    key_file = tmp_path / "keys.json"
    key_file.write_text(secret_text(fake, "wsi-acme", "weightship-api-keys", "keys.json"))
    (ci,) = [k for k in json.loads(key_file.read_text())["keys"] if k["name"] == "ci"]
    log = UsageLog(tmp_path / "usage" / "weightship-0.jsonl")
    stack.callback(log.close)
    for rid, when, tokens in (("req_1", "2026-05-01T23:59:59.999Z", 5),
                              ("req_2", "2026-05-02T00:00:00.000Z", 7),
                              ("req_3", "2026-05-02T10:00:00.000Z", 11)):
        log.append({"id": rid, "time": when, "key_id": ci["id"], "key_name": "ci",
                    "model": NAME, "route": "/v1/completions", "status": 200,
                    "prompt_tokens": 1, "completion_tokens": tokens, "duration_s": 0.1})
    srv = stack.enter_context(BackgroundServer(ServerState(
        NAME, keyring=load_key_file(key_file), usage_log=log)))
    return str(srv.port), ci["id"]


def test_usage_fails_naming_the_replicas_it_could_not_read_unless_partial(
        two_pools: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_ok(cli, capsys, "create", "acme", *TINY)
    run_ok(cli, capsys, "keys", "add", "acme", "--key-name", "ci", "--json")
    with contextlib.ExitStack() as stack:
        port, ci = _log_server(stack, two_pools, tmp_path)
        _server_pod_with_claim(two_pools, "weightship-0", int(port), "models-weightship-0")
        for i in range(2):  # replica 1 was scaled down: its claim and its records stay
            two_pools.seed({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {
                "name": f"models-weightship-{i}", "namespace": "wsi-acme",
                "labels": {"app.kubernetes.io/instance": "acme"}},
                "spec": {"resources": {"requests": {"storage": "2Gi"}}}})
        code, out, err = cli("instance", "usage", "acme", "--json", capsys=capsys)
        assert code == 1 and out == "", (code, out, err)
        assert "claim models-weightship-1 (no running pod mounts it)" in err.splitlines()[0]
        assert "models-weightship-0" not in err and "--partial" in err

        partial = run_ok(cli, capsys, "usage", "acme", "--json", "--partial")
        assert partial["unreached"] == ["claim models-weightship-1 (no running pod mounts it)"]
        assert partial["rows"] == [{"key_name": "ci", "key_id": ci, "requests": 3,
                                    "prompt_tokens": 3, "completion_tokens": 23, "errors": 0}]

        # the window is applied by the server: only day 2 crosses the pod proxy
        two_pools.store.requests.clear()
        (day,) = run_ok(cli, capsys, "usage", "acme", "--by", "day", "--since", "2026-05-02",
                        "--json", "--partial")["rows"]
        assert (day["day"], day["requests"], day["completion_tokens"]) == ("2026-05-02", 2, 18)
        asked = [p for _, p in two_pools.store.requests if "/proxy/v1/usage" in p]
        assert len(asked) == 1 and "since=2026-05-02T00%3A00%3A00%2B00%3A00" in asked[0], asked


def test_usage_with_shared_storage_reads_the_shared_claim_once(
        two_pools: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """storage.mode=sharedPVC: every replica writes to the claim weightship-models, which is
    not a replica that could not be read, even with a replica that is not running."""
    run_ok(cli, capsys, "create", "acme", *TINY, "--replicas", "2", "--set",
           "storage.mode=sharedPVC")
    run_ok(cli, capsys, "keys", "add", "acme", "--key-name", "ci", "--json")
    assert the(two_pools, "v1", "PersistentVolumeClaim", "wsi-acme", "weightship-models")
    with contextlib.ExitStack() as stack:
        port, _ = _log_server(stack, two_pools, tmp_path)
        _server_pod_with_claim(two_pools, "weightship-0", int(port), "weightship-models")
        code, out, err = cli("instance", "usage", "acme", "--json", capsys=capsys)
        assert code == 0 and "not read" not in err, err
        assert [r["requests"] for r in json.loads(out)] == [3]
        _server_pod_with_claim(two_pools, "weightship-1", int(port), "weightship-models",
                               phase="Pending")
        code, out, err = cli("instance", "usage", "acme", "--json", capsys=capsys)
        assert code == 0 and "not read" not in err, err
