"""Whose word the Hub source takes for a digest (issue 17, item 1, and the review's last finding).

The card pins the Mistral repo's commit, every file's size and the tokenizer's sha256, not the
weights' sha256 (no published source for them was found). A server at ``HF_ENDPOINT`` that lists
the card's sizes with sha256s of its own would be the only anchor for the weights; so a listing
that is not the public Hub's is treated like a manifest its own server sent, unsigned: refused
over plain ``http://`` for a card's files the card does not pin by sha256, taken over https with
a warning that names the endpoint, recorded as ``unsigned-hub-listing``, and never enough for
``convert`` to unpickle. A card binds an explicit ``hf://`` fetch of its repository at its
pinned commit as it binds ``fetch CARD``.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import Pki, assert_clean_failure, run_cli
from tests.fetch.hubstub import HubRepo, hub
from weightship.catalog import load_card
from weightship.manifest import Manifest
from weightship.mirror import MirrorServer
from weightship.mirror.server import Tls

MISTRAL = "mistralai/Mistral-7B-v0.1"
PINNED = "27d67f1b5f57dc0953326b2601d68371d40ea8da"
TOKENIZER = (importlib.resources.files("weightship.catalog") / "data" / "tokenizer.model.v1").read_bytes()
SHARD = "model-00001-of-00002.safetensors"


def _card_size(path: str) -> int:
    (size,) = [f.size for f in load_card("mistral-7b-v0.1").layout("hf").files or () if f.path == path]
    assert size is not None
    return size


def _tampered(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x20
    return bytes(out)


def test_an_http_endpoint_listing_the_cards_sizes_with_its_own_digests_is_refused(tmp_path: Path) -> None:
    """Other weights, listed with the card's size and the server's own LFS sha256 (the bytes
    themselves are small: nothing may be downloaded to find out)."""
    other = b"not the Mistral weights" * 1000
    with hub(tmp_path / "cdn") as h:
        h.add(MISTRAL, HubRepo(commit=PINNED, files={SHARD: other, "tokenizer.model": TOKENIZER},
                               listed_size={SHARD: _card_size(SHARD)}))
        dest = tmp_path / "m"
        r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--include", SHARD,
                    "--include", "tokenizer.model", "--to", dest, env={"HF_ENDPOINT": h.url})
        served = h.cdn.bytes_served
        # only what the card pins by sha256 is taken from it
        tok = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--include", "tokenizer.model",
                      "--to", dest, "--json", env={"HF_ENDPOINT": h.url})
    assert_clean_failure(r, 1)
    assert "refusing the Hub listing" in r.stderr and "plain HTTP" in r.stderr and SHARD in r.stderr
    assert h.url in r.stderr
    assert served == 0  # refused before a byte
    assert not (dest / SHARD).exists()
    assert tok.code == 0, tok.stderr
    assert [(f["path"], f["anchor"]) for f in json.loads(tok.stdout)["manifest"]["files"]] == [
        ("tokenizer.model", "catalog")]


def test_the_card_binds_an_hf_uri_of_its_repo_at_its_commit(tmp_path: Path) -> None:
    bad = _tampered(TOKENIZER)
    with hub(tmp_path / "cdn") as h:
        h.add(MISTRAL, HubRepo(commit=PINNED, files={"tokenizer.model": bad}))
        env = {"HF_ENDPOINT": h.url}
        at_pin = run_cli("fetch", f"hf://{MISTRAL}@{PINNED}", "--to", tmp_path / "a", env=env)
        at_main = run_cli("fetch", f"hf://{MISTRAL}", "--to", tmp_path / "b", env=env)
        served = h.cdn.bytes_served
    for r in (at_pin, at_main):  # main resolves to the pinned commit here: bound just the same
        assert_clean_failure(r, 3)
        assert "tokenizer.model" in r.stderr and "(the catalog card)" in r.stderr, r.stderr
    assert served == 0
    assert not (tmp_path / "a" / "tokenizer.model").exists()


def test_another_commit_of_the_repo_is_not_the_cards(tmp_path: Path) -> None:
    with hub(tmp_path / "cdn") as h:
        h.add(MISTRAL, HubRepo(commit="4" * 40, files={"tokenizer.model": _tampered(TOKENIZER)}))
        r = run_cli("fetch", f"hf://{MISTRAL}", "--to", tmp_path / "m", "--json",
                    env={"HF_ENDPOINT": h.url})
    assert r.code == 0, r.stderr
    m = json.loads(r.stdout)["manifest"]
    assert m["source"]["revision"] == "4" * 40
    assert [(f["path"], f["anchor"]) for f in m["files"]] == [("tokenizer.model", "unsigned-hub-listing")]


@pytest.fixture
def original_root(tiny_original_dir: Path, tmp_path: Path) -> Path:
    """A mirror root holding the tiny model's original layout (a pickled .pth) as acme/orig."""
    d = tmp_path / "hub" / "acme" / "orig"
    shutil.copytree(tiny_original_dir, d, copy_function=os.link)
    (d / "consolidated.safetensors").unlink()
    m = Manifest.load(d)
    m.files = [f for f in m.files if f.path != "consolidated.safetensors"]
    m.write(d)
    return tmp_path / "hub"


def test_an_https_endpoint_is_named_as_the_anchor_and_convert_will_not_unpickle_on_it(
        original_root: Path, pki: Pki, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    with MirrorServer(original_root, tls=Tls(pki.cert, pki.key)) as mirror:
        env = {"HF_ENDPOINT": mirror.url, "SSL_CERT_FILE": str(pki.ca)}
        r = run_cli("fetch", "hf://acme/orig", "--include", "*", "--to", dest, "--json", env=env)
    assert r.code == 0, r.stderr
    assert mirror.url in r.stderr and "unsigned-hub-listing" in r.stderr, r.stderr
    files = json.loads(r.stdout)["manifest"]["files"]
    assert "consolidated.00.pth" in {f["path"] for f in files}
    assert {f["anchor"] for f in files} == {"unsigned-hub-listing"}
    refused = run_cli("convert", dest)
    assert_clean_failure(refused, 3)
    assert "unsigned-hub-listing" in refused.stderr and "--manifest" in refused.stderr
    assert not (dest / "consolidated.safetensors").exists()
