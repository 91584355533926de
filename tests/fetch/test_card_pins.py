"""A catalog card's pins (the Hub commit, every size and sha256) bind every source (issue 17, 1).

The Hub is played by ``weightship mirror`` (a directory served under the Mistral repo's name, as
the outside review did) and by the stand-in of :mod:`tests.fetch.hubstub` (which answers for the
card's pinned commit). A source that lists or serves anything but what the card pins is refused
with exit 3, before a byte is written where the size or digest is known up front, and nothing is
promoted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_clean_failure, run_cli
from tests.fetch.hubstub import HubRepo, hub
from tests.fetch.webserver import serve
from weightship.catalog import load_card, parse_card
from weightship.errors import CatalogError
from weightship.fetch import FetchOptions, FetchRequest, TransferOptions, fetch
from weightship.manifest import Manifest, create_for_directory
from weightship.mirror import MirrorServer

MISTRAL = "mistralai/Mistral-7B-v0.1"
PINNED = "27d67f1b5f57dc0953326b2601d68371d40ea8da"
TOKENIZER = (importlib.resources.files("weightship.catalog") / "data" / "tokenizer.model.v1").read_bytes()
TOKENIZER_SHA = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def _tampered(data: bytes) -> bytes:
    """The same size, one byte changed."""
    out = bytearray(data)
    out[len(out) // 2] ^= 0x20
    return bytes(out)


def _nothing_landed(dest: Path) -> None:
    assert not (dest / "tokenizer.model").exists()
    assert not (dest / ".weightship" / "manifest.json").exists()
    assert not list((dest / ".weightship").rglob("*.incomplete")) if dest.exists() else True


def test_the_card_is_fetched_at_its_pinned_commit(tmp_path: Path) -> None:
    assert hashlib.sha256(TOKENIZER).hexdigest() == TOKENIZER_SHA
    with hub(tmp_path / "cdn") as h:
        h.add(MISTRAL, HubRepo(commit=PINNED, files={"tokenizer.model": TOKENIZER}))
        r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--include", "tokenizer.model",
                    "--to", tmp_path / "m", "--json", env={"HF_ENDPOINT": h.url})
        asked = list(h.revisions_asked)
    assert r.code == 0, r.stderr
    m = json.loads(r.stdout)["manifest"]
    assert asked == [PINNED]  # not main
    assert m["source"]["revision"] == PINNED
    assert [(f["path"], f["sha256"], f["anchor"]) for f in m["files"]] == [
        ("tokenizer.model", TOKENIZER_SHA, "catalog")]
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == TOKENIZER


def test_revision_overrides_the_pin(tmp_path: Path) -> None:
    with hub(tmp_path / "cdn") as h:
        h.add(MISTRAL, HubRepo(commit="1" * 40, files={"tokenizer.model": TOKENIZER}))
        r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--include", "tokenizer.model",
                    "--revision", "main", "--to", tmp_path / "m", "--json", env={"HF_ENDPOINT": h.url})
        asked = list(h.revisions_asked)
    assert r.code == 0, r.stderr
    assert asked == ["main"]
    assert json.loads(r.stdout)["manifest"]["source"]["revision"] == "1" * 40


def test_a_hub_answering_another_commit_for_the_pinned_one_is_refused(tmp_path: Path) -> None:
    with hub(tmp_path / "cdn") as h:
        h.add(MISTRAL, HubRepo(commit="2" * 40, files={"tokenizer.model": TOKENIZER}, aliases={PINNED}))
        r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--include", "tokenizer.model",
                    "--to", tmp_path / "m", env={"HF_ENDPOINT": h.url})
        sent = h.cdn.bytes_served
    assert_clean_failure(r, 3)
    assert "commit mismatch" in r.stderr and PINNED in r.stderr
    assert sent == 0
    _nothing_landed(tmp_path / "m")


@pytest.mark.parametrize("lie", ["listed", "served"])
def test_a_hub_serving_another_tokenizer_is_refused_with_exit_3(tmp_path: Path, lie: str) -> None:
    """``listed``: the Hub's metadata describes the other file (its own sha256): refused before
    a byte is downloaded. ``served``: the metadata is right but the bytes are not: refused after
    the download, before promotion."""
    bad = _tampered(TOKENIZER)
    with hub(tmp_path / "cdn") as h:
        repo = HubRepo(commit=PINNED, files={"tokenizer.model": bad})
        if lie == "served":
            repo.listed_sha256["tokenizer.model"] = TOKENIZER_SHA
        h.add(MISTRAL, repo)
        dest = tmp_path / "m"
        r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--include", "tokenizer.model",
                    "--to", dest, env={"HF_ENDPOINT": h.url})
        served = h.cdn.bytes_served
    assert_clean_failure(r, 3)
    assert "tokenizer.model" in r.stderr and "mismatch" in r.stderr
    _nothing_landed(dest)
    if lie == "listed":
        assert served == 0, served  # refused before the download
        assert "catalog card" in r.stderr


@pytest.fixture
def fake_mistral_root(tmp_path: Path, tiny_hf_dir: Path) -> Path:
    """What the outside review served: the tiny model's files under the Mistral repo's name and
    file names, with a modified tokenizer.model of the right size."""
    d = tmp_path / "hub" / "mistralai" / "Mistral-7B-v0.1"
    d.mkdir(parents=True)
    os.link(tiny_hf_dir / "model.safetensors", d / "model-00001-of-00002.safetensors")
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    (d / "tokenizer.model").write_bytes(_tampered(TOKENIZER))
    create_for_directory(d).write(d)
    return tmp_path / "hub"


def test_the_mirror_serving_a_fake_mistral_is_refused_before_a_byte(fake_mistral_root: Path,
                                                                    tmp_path: Path) -> None:
    dest = tmp_path / "m"
    with MirrorServer(fake_mistral_root) as mirror:
        env = {"HF_ENDPOINT": mirror.url}
        r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--revision", "main",
                    "--to", dest, env=env)
        sent = mirror.bytes_sent
        # the tokenizer alone: its size is right, its sha256 (the mirror's own) is not the card's
        tok = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--revision", "main",
                      "--include", "tokenizer.model", "--to", dest, env=env)
        pinned = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--to", dest, env=env)
        sent_total = mirror.bytes_sent
    assert_clean_failure(r, 3)
    assert "size mismatch" in r.stderr and "(the catalog card)" in r.stderr, r.stderr
    assert_clean_failure(tok, 3)
    assert TOKENIZER_SHA in tok.stderr
    assert sent == 0 and sent_total == 0  # no byte of a file was ever sent
    assert_clean_failure(pinned, 1)  # without --revision the card's commit is asked for
    assert PINNED in pinned.stderr
    _nothing_landed(dest)
    assert not (dest / "model-00001-of-00002.safetensors").exists()


def _tiny_card(tiny: Path, *, pin_sha: set[str], sources: list[dict[str, object]]) -> FetchRequest:
    m = Manifest.load(tiny)
    card = parse_card({
        "name": "tiny-pinned", "license": "Apache-2.0", "default_layout": "hf",
        "layouts": {"hf": {"files": [{"path": f.path, "size": f.size,
                                      **({"sha256": f.sha256} if f.path in pin_sha else {})}
                                     for f in m.files]}},
        "architecture": {"dim": 8, "n_layers": 1, "head_dim": 4, "hidden_dim": 8, "n_heads": 2,
                         "n_kv_heads": 1, "norm_eps": 1e-5, "vocab_size": 10},
        "sources": sources,
    }, "test")
    return FetchRequest(ref="tiny-pinned", card=card, options=FetchOptions(
        transfer=TransferOptions(retries=1, backoff=0.01)))


def test_the_card_binds_a_user_manifest_too(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """An https source whose digests come from --manifest: the card's sha256 still wins."""
    served = tmp_path / "srv"
    shutil.copytree(tiny_hf_dir, served)
    (served / "tokenizer.model").write_bytes(_tampered(TOKENIZER))
    create_for_directory(served).write(served)  # a manifest that vouches for the other tokenizer
    with serve(served) as s:
        req = _tiny_card(tiny_hf_dir, pin_sha={"tokenizer.model"}, sources=[{"kind": "https", "url": s.url}])
        req = FetchRequest(ref=req.ref, card=req.card,
                           options=dataclasses.replace(req.options, manifest=served / ".weightship" / "manifest.json"))
        from weightship.errors import DigestMismatchError

        with pytest.raises(DigestMismatchError, match="catalog card"):
            fetch(req, tmp_path / "m")
        assert s.bytes_served == 0
    assert not (tmp_path / "m" / "tokenizer.model").exists()


def test_the_mistral_card_pins_its_commit_and_the_instruct_cards_theirs() -> None:
    r = run_cli("models", "--json")
    assert r.code == 0, r.stderr
    revisions = {m["name"]: m["hub_revisions"] for m in json.loads(r.stdout)}
    assert revisions["mistral-7b-v0.1"] == {MISTRAL: PINNED}
    for name in ("mistral-7b-instruct-v0.1", "mistral-7b-instruct-v0.2"):
        (commit,) = revisions[name].values()
        assert commit is not None and len(commit) == 40


def test_an_unpinned_card_says_so_when_fetched(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = json.loads(json.dumps(load_card("mistral-7b-instruct-v0.1").raw))
    del raw["sources"][0]["revision"]
    # the stand-in is plain http: a card fetch takes from it only what the card pins by sha256
    raw["layouts"]["hf"]["files"] = [{"path": "tokenizer.model", "size": len(TOKENIZER),
                                      "sha256": TOKENIZER_SHA}]
    card = parse_card(raw, "unpinned test card")
    assert card.hub_revision(card.sources[0]) is None
    with hub(tmp_path / "cdn") as h:
        h.add("mistralai/Mistral-7B-Instruct-v0.1",
              HubRepo(commit="3" * 40, files={"tokenizer.model": TOKENIZER}))
        os.environ["HF_ENDPOINT"] = h.url
        try:
            result = fetch(FetchRequest(ref=card.name, card=card, include=("tokenizer.model",)),
                           tmp_path / "m")
        finally:
            del os.environ["HF_ENDPOINT"]
        assert h.revisions_asked == ["main"]
    assert result.manifest.source is not None and result.manifest.source.revision == "3" * 40
    assert any("pins no Hub commit" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("revision", ["main", "v0.1", "27d67f1"])
def test_a_card_pins_a_commit_not_a_branch(revision: str) -> None:
    raw = json.loads(json.dumps(load_card("mistral-7b-v0.1").raw))
    raw["sources"][0]["revision"] = revision
    with pytest.raises(CatalogError, match="40-hex commit"):
        parse_card(raw, "test")
