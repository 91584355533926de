"""``weightship instance usage`` against a real ``weightship serve`` behind the fake API server's
pod proxy: 200 requests over three keys, the server stopped with SIGTERM while streams run and
killed with ``kill -9`` in the middle, and the per-key sums equal what the clients were told."""

from __future__ import annotations

import base64
import json
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from fakekube import FakeKube
from instance_helpers import TINY, run_ok, seed_server_pod, the

from tests.net import free_port
from tests.runtime.serving import start

NAME = "weightship-tiny"


class Clients:
    """Requests of three keys, and the sums of what each key's answers said."""

    def __init__(self, url: str, keys: dict[str, str]) -> None:
        self.keys = keys
        self.clients = {name: openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                                            timeout=120) for name, key in keys.items()}
        self.told: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def count(self, key: str, **amounts: int) -> None:
        with self.lock:
            for field, n in amounts.items():
                self.told[(key, field)] += n

    def one(self, i: int) -> None:
        key = list(self.keys)[i % 3]
        client = self.clients[key]
        if i % 23 == 0:
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model=NAME, prompt="x", max_tokens=1, n=100)
            self.count(key, errors=1)
            return
        if i % 4 == 0:
            usage = None
            for chunk in client.chat.completions.create(
                    model=NAME, messages=[{"role": "user", "content": f"Question {i}?"}],
                    max_tokens=3 + i % 5, stream=True, stream_options={"include_usage": True}):
                usage = chunk.usage or usage
        else:
            usage = client.completions.create(model=NAME, prompt=f"Item {i} of the list is",
                                              max_tokens=2 + i % 7).usage
        assert usage is not None
        self.count(key, requests=1, prompt_tokens=usage.prompt_tokens,
                   completion_tokens=usage.completion_tokens)

    def many(self, indexes: range) -> None:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(self.one, indexes))


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
    serve = ("--api-key-file", key_file, "--usage-log", tmp_path / "usage" / "weightship-0.jsonl")
    url = f"http://127.0.0.1:{port}"
    clients = Clients(url, keys)

    proc = start(tiny_hf_dir, port, *serve)
    try:
        clients.many(range(0, 60))
        # SIGTERM while eight streams run: they finish (drain), and are counted once
        started = threading.Barrier(9)

        def stream(i: int) -> None:
            key = list(keys)[i % 3]
            usage = None
            for n, chunk in enumerate(clients.clients[key].completions.create(
                    model=NAME, prompt="Drain me", max_tokens=40, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})):
                if n == 0:
                    started.wait(60)
                usage = chunk.usage or usage
            assert usage is not None and usage.completion_tokens == 40
            clients.count(key, requests=1, prompt_tokens=usage.prompt_tokens,
                          completion_tokens=usage.completion_tokens)

        streams = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in streams:
            t.start()
        started.wait(60)
        proc.send_signal(signal.SIGTERM)
        for t in streams:
            t.join(120)
        assert proc.wait(60) == 0

        proc = start(tiny_hf_dir, port, *serve)
        clients.many(range(60, 130))
        proc.kill()  # kill -9: no chance to flush anything of its own
        proc.wait(30)

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
    rows = json.loads(out)
    assert sum(clients.told[(k, "requests")] + clients.told[(k, "errors")] for k in keys) == 200
    assert [r["key_name"] for r in rows] == ["alice", "bob", "carol"]
    for row in rows:
        assert set(row) == {"key_name", "key_id", "requests", "prompt_tokens",
                            "completion_tokens", "errors"}
        for field in ("requests", "prompt_tokens", "completion_tokens", "errors"):
            assert row[field] == clients.told[(row["key_name"], field)], (row, field)
    assert by_day[0] == 0
    (day,) = json.loads(by_day[1])
    assert day["requests"] == sum(r["requests"] for r in rows)
    assert day["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert csv_out[0] == 0 and csv_out[1].splitlines()[0] == \
        "key_name,key_id,requests,prompt_tokens,completion_tokens,errors"
    lines = (tmp_path / "usage" / "weightship-0.jsonl").read_text().splitlines()
    assert len({json.loads(line)["id"] for line in lines}) == len(lines) == 200
