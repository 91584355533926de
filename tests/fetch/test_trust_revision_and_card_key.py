"""Two smaller findings of the outside review on issue 17: an abbreviated ``--revision`` binds the
commit the Hub answers, and a card's ``trust_key`` path means the file beside the card."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import Pki, assert_clean_failure, run_cli
from tests.fetch.conftest import KeyPair
from tests.fetch.hubstub import HubRepo, hub
from tests.fetch.webserver import serve
from weightship.catalog import load_card, load_card_file
from weightship.fetch import FetchRequest, fetch
from weightship.manifest import Manifest

MISTRAL = "mistralai/Mistral-7B-v0.1"
PINNED = "27d67f1b5f57dc0953326b2601d68371d40ea8da"
TOKENIZER = (importlib.resources.files("weightship.catalog") / "data" / "tokenizer.model.v1").read_bytes()


@pytest.mark.parametrize(("answers", "code"), [(PINNED, 0), ("2" * 40, 3)])
def test_a_short_revision_must_begin_the_commit_the_hub_answers(tmp_path: Path, answers: str,
                                                                code: int) -> None:
    with hub(tmp_path / "cdn") as h:
        h.add(MISTRAL, HubRepo(commit=answers, files={"tokenizer.model": TOKENIZER}, aliases={PINNED[:7]}))
        r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--revision", PINNED[:7],
                    "--include", "tokenizer.model", "--to", tmp_path / "m", "--json",
                    env={"HF_ENDPOINT": h.url})
        served = h.cdn.bytes_served
    if code == 0:
        assert r.code == 0, r.stderr
        assert json.loads(r.stdout)["manifest"]["source"]["revision"] == PINNED
    else:
        assert_clean_failure(r, 3)
        assert "commit mismatch" in r.stderr and PINNED[:7] in r.stderr, r.stderr
        assert served == 0
        assert not (tmp_path / "m" / "tokenizer.model").exists()


def test_a_cards_trust_key_path_is_relative_to_the_card_file(signed_tiny_dir: Path, signing_key: KeyPair,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cards = tmp_path / "cards"
    (cards / "keys").mkdir(parents=True)
    shutil.copy(signing_key.public, cards / "keys" / "acme.pub")
    raw = json.loads(json.dumps(load_card("weightship-tiny").raw))
    # sizes pinned, no sha256: the signed manifest supplies the digests, if the key is found
    raw["layouts"]["hf"]["files"] = [{"path": f["path"], "size": f["size"]} for f in raw["layouts"]["hf"]["files"]]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where `keys/acme.pub` is nothing
    with serve(signed_tiny_dir) as s:
        raw["sources"] = [{"kind": "https", "url": s.url, "trust_key": "keys/acme.pub"}]
        (cards / "acme-tiny.yaml").write_text(yaml.safe_dump({**raw, "name": "acme-tiny"}))
        card = load_card_file(cards / "acme-tiny.yaml")
        assert card.sources[0]["trust_key"] == str(cards / "keys" / "acme.pub")
        result = fetch(FetchRequest(ref="acme-tiny", card=card), tmp_path / "m")
    assert {f.anchor for f in result.manifest.files} == {"signed-manifest"}


def test_a_refetch_from_a_weaker_anchor_keeps_the_stronger_record(signed_tiny_dir: Path, signing_key: KeyPair,
                                                                  pki: Pki, tmp_path: Path) -> None:
    """Fetched with a signed manifest, then again (nothing changed) from a server whose manifest
    is unsigned: the record still says signed-manifest, so convert's rule is not weakened."""
    import ssl

    dest = tmp_path / "m"
    with serve(signed_tiny_dir) as s:
        r = run_cli("fetch", s.url, "--to", dest, "--trust-key", signing_key.public, "--json")
    assert r.code == 0, r.stderr
    assert {f["anchor"] for f in json.loads(r.stdout)["manifest"]["files"]} == {"signed-manifest"}
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.cert, pki.key)
    with serve(signed_tiny_dir, tls=ctx) as s:
        again = run_cli("fetch", s.url, "--to", dest, "--json", env={"SSL_CERT_FILE": str(pki.ca)})
    assert again.code == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["fetched"] == []
    assert {f["anchor"] for f in out["manifest"]["files"]} == {"signed-manifest"}
    assert {f.anchor for f in Manifest.load(dest).files} == {"signed-manifest"}


def test_a_refetch_with_a_trusted_key_raises_a_weak_record(signed_tiny_dir: Path, signing_key: KeyPair,
                                                            pki: Pki, tmp_path: Path) -> None:
    """Fetched over TLS on the server's unsigned word, then again (nothing changed) with the key
    that signed the manifest: the record becomes signed-manifest (before, the weak record stayed
    and convert went on refusing what a trusted key now vouches for)."""
    import ssl

    dest = tmp_path / "m"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.cert, pki.key)
    with serve(signed_tiny_dir, tls=ctx) as s:
        env = {"SSL_CERT_FILE": str(pki.ca)}
        first = run_cli("fetch", s.url, "--to", dest, "--json", env=env)
        assert first.code == 0, first.stderr
        assert {f["anchor"] for f in json.loads(first.stdout)["manifest"]["files"]} == {"unsigned-remote-manifest"}
        again = run_cli("fetch", s.url, "--to", dest, "--trust-key", signing_key.public, "--json", env=env)
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["fetched"] == []
    assert {f.anchor for f in Manifest.load(dest).files} == {"signed-manifest"}
