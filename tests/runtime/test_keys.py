"""API keys in the hashed key file: what the file holds, how a key is checked, and a real
``weightship serve`` that reloads the file: a key added is accepted and a key revoked refused
within 10 seconds, while streams of that key run on to their end."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.net import free_port, wait_until
from tests.runtime.serving import serving
from weightship.errors import KeyFileError
from weightship.runtime import keys as keys_module
from weightship.runtime.keys import KeyFile, KeyRing, load_key_file, parse, parse_hashed

NAME = "weightship-tiny"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` as an operator's tool (or the kubelet's Secret volume) does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_the_key_file_holds_hashes_never_keys() -> None:
    keys = KeyFile("acme")
    entry, key = keys.add("ci")
    text = keys.to_text()
    assert key.startswith("wsk_") and len(key) >= 36 and key not in text
    stored = json.loads(text)
    assert stored["format"] == "weightship-api-keys/1" and stored["instance"] == "acme"
    (record,) = stored["keys"]
    assert record == {"id": entry.id, "name": "ci", "created": entry.created,
                      "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest(),
                      "scopes": ["inference"]}
    assert parse_hashed(text).keys == [entry]
    other = KeyFile("acme")
    _, second = other.add("ci")
    assert second != key and other.keys[0].id != entry.id  # random, not derived from the name


def test_plain_key_files_still_work_and_get_ids_not_secrets() -> None:
    entries = parse("# ops\nsk-one\n\n  sk-two  \n")
    assert [e.name for e in entries] == ["line-2", "line-4"]
    assert all(e.id.startswith("plain-") and "sk-" not in e.id for e in entries)
    ring = KeyRing(None, entries)
    assert ring.authenticate(b"sk-two") == entries[1]
    assert ring.authenticate(b"sk-three") is None


@pytest.mark.parametrize("text", ['{"format": "weightship-api-keys/1", "keys": [{"id": "k"}]}',
                                  '{"format": "other/1", "keys": []}',
                                  '{"format": "weightship-api-keys/1", "keys": [{"id": "k", '
                                  '"name": "n", "hash": "sha256:abc"}]}', "{not json"])
def test_a_malformed_key_file_is_a_clear_error(text: str) -> None:
    with pytest.raises(KeyFileError):
        parse(text)


def test_every_hash_is_compared_in_constant_time_whatever_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    keys = KeyFile("acme")
    made = [keys.add(f"k{i}")[1] for i in range(5)]
    ring = KeyRing(None, keys.keys)
    calls: list[tuple[bytes, bytes]] = []
    real = keys_module.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    for presented, want in ((made[0], keys.keys[0]), (made[4], keys.keys[4]),
                            ("wsk_nope", None), (made[2][:-1], None)):
        calls.clear()
        assert ring.authenticate(presented.encode()) == want
        # every stored digest, each against the digest of what was presented (never the key)
        assert [b for _, b in calls] == [e.digest for e in keys.keys]
        assert {a for a, _ in calls} == {hashlib.sha256(presented.encode()).digest()}


def test_a_reload_that_fails_keeps_the_last_good_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = KeyFile("acme")
    _, key = keys.add("ci")
    path.write_text(keys.to_text())
    ring = load_key_file(path)
    write_atomically(path, "{half a file")
    assert ring.reload_if_changed() is False
    assert ring.authenticate(key.encode()) is not None
    keys.remove("ci")
    write_atomically(path, keys.to_text())
    assert ring.reload_if_changed() is True and ring.authenticate(key.encode()) is None


def test_an_empty_hashed_file_starts_a_server_that_refuses_everyone(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(KeyFile("acme").to_text())
    assert load_key_file(path).entries == ()
    (tmp_path / "plain.txt").write_text("# none yet\n")
    with pytest.raises(KeyFileError, match="holds no keys"):
        load_key_file(tmp_path / "plain.txt")


def test_revoked_while_eight_streams_run(tiny_hf_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = KeyFile("acme")
    _, ci = keys.add("ci")
    write_atomically(path, keys.to_text())
    other_instance = KeyFile("globex")
    _, foreign = other_instance.add("ci")
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)

    def status(key: str) -> int:  # a route that answers at once, even with every slot busy
        return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                         timeout=30).status_code

    with serving(tiny_hf_dir, port, "--api-key-file", path):
        assert client(ci).completions.create(model=NAME, prompt="Hello", max_tokens=3).usage
        assert status(foreign) == 401  # a key of another instance is refused
        assert status("wsk_" + "x" * 43) == 401

        # a key added while the server runs is accepted within seconds
        _, deploy = keys.add("deploy")
        write_atomically(path, keys.to_text())
        wait_until(lambda: status(deploy) == 200, 10, "the added key to be accepted")

        # eight long streams of "ci", then "ci" is revoked while they run
        results: list[dict[str, Any]] = []
        started = threading.Barrier(9)

        def stream() -> None:
            chunks = client(ci).completions.create(
                model=NAME, prompt="Once upon a time", max_tokens=200, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, usage, finish = [], None, None
            for i, chunk in enumerate(chunks):
                if i == 0:
                    started.wait(60)
                if chunk.choices:
                    text.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            results.append({"usage": usage, "finish": finish, "done_at": time.monotonic()})

        threads = [threading.Thread(target=stream) for _ in range(8)]
        for t in threads:
            t.start()
        started.wait(60)  # every stream is under way
        keys.remove("ci")
        write_atomically(path, keys.to_text())
        revoked_at = time.monotonic()
        wait_until(lambda: status(ci) == 401, 10, "the revoked key to be refused")
        refused_at = time.monotonic()
        assert refused_at - revoked_at < 10
        assert status(deploy) == 200  # the other key still works
        for t in threads:
            t.join(300)
        assert len(results) == 8  # none dropped
        for r in results:
            assert r["finish"] == "length" and r["usage"].completion_tokens == 200
        # the streams were still running when the key was already refused
        assert max(r["done_at"] for r in results) > refused_at


def test_a_hashed_file_that_comes_back_empty_keeps_the_last_good_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = KeyFile("acme")
    _, key = keys.add("ci")
    write_atomically(path, keys.to_text())
    ring = load_key_file(path)
    for text in ("", "\n", "sk-plain-key\n"):  # empty, or suddenly the other form
        write_atomically(path, text)
        assert ring.reload_if_changed() is False, repr(text)
        assert ring.authenticate(key.encode()) is not None, repr(text)
    plain = tmp_path / "keys.txt"
    write_atomically(plain, "sk-one\n")
    ring = load_key_file(plain)
    write_atomically(plain, "")  # a plain file that loses its last key is not "no keys" either
    assert ring.reload_if_changed() is False and ring.authenticate(b"sk-one") is not None


def test_valid_keys_keep_working_while_the_file_is_rewritten_in_place(tmp_path: Path) -> None:
    """An editor (or a tool) that truncates the file and writes it again: a server that reloads
    between the steps answers every valid key, never a transient 401."""
    from weightship.runtime.runner import BackgroundServer
    from weightship.runtime.server import ServerState

    path = tmp_path / "keys.json"
    keys = KeyFile("acme")
    _, kept = keys.add("ci")
    write_atomically(path, keys.to_text())
    ring = load_key_file(path)
    _, added = keys.add("deploy")
    new_text = keys.to_text().encode()
    with BackgroundServer(ServerState(NAME, keyring=ring)) as srv:
        def status(key: str) -> int:
            return httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                             timeout=30).status_code

        assert status(kept) == 200 and status(added) == 401
        with open(path, "r+b") as f:
            f.truncate(0)  # step 1: empty
            f.flush()
            ring.reload_if_changed()
            assert status(kept) == 200, "the empty file replaced the keys"
            f.write(new_text[:len(new_text) // 2])  # step 2: half of it
            f.flush()
            ring.reload_if_changed()
            assert status(kept) == 200, "the half-written file replaced the keys"
            f.write(new_text[len(new_text) // 2:])  # step 3: all of it
        assert ring.reload_if_changed() is True
        assert status(kept) == 200 and status(added) == 200
        assert ring.digest == "sha256:" + hashlib.sha256(new_text).hexdigest()
