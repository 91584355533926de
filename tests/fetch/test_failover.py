"""``--source auto``: a card's sources tried in order, per file, until one delivers the right bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Pki
from tests.fetch.webserver import serve
from weightship.catalog import parse_card
from weightship.fetch import FetchOptions, FetchRequest, TransferOptions, fetch
from weightship.manifest import Manifest
from weightship.mirror import MirrorServer
from weightship.mirror.server import Tls

FAST = FetchOptions(transfer=TransferOptions(retries=1, backoff=0.01, backoff_max=0.02, stall_timeout=2.0))


def _card(tiny: Path, *sources: dict[str, object]) -> FetchRequest:
    m = Manifest.load(tiny)
    card = parse_card({
        "name": "tiny-mirrored", "license": "Apache-2.0", "default_layout": "hf",
        "layouts": {"hf": {"files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in m.files]}},
        "architecture": {"dim": 8, "n_layers": 1, "head_dim": 4, "hidden_dim": 8, "n_heads": 2,
                         "n_kv_heads": 1, "norm_eps": 1e-5, "vocab_size": 10},
        "sources": list(sources),
    }, "test")
    return FetchRequest(ref="tiny-mirrored", card=card, options=FAST)


def test_auto_finishes_from_the_good_source_when_one_is_corrupt(tiny_hf_dir: Path, tmp_path: Path) -> None:
    with serve(tiny_hf_dir) as bad, serve(tiny_hf_dir) as good:
        bad.lie("flip", paths={"model.safetensors"})
        req = _card(tiny_hf_dir, {"kind": "https", "url": bad.url}, {"kind": "https", "url": good.url})
        result = fetch(req, tmp_path / "m")
    m = Manifest.load(tmp_path / "m")
    sources = {f.path: f.source for f in m.files}
    assert sources["model.safetensors"] == good.url + "model.safetensors"
    assert sources["config.json"] == bad.url + "config.json"  # the first source's good files stay
    assert {f.anchor for f in m.files} == {"catalog"}
    assert sorted(result.fetched) == sorted(f.path for f in Manifest.load(tiny_hf_dir).files)
    for f in m.files:
        assert (tmp_path / "m" / f.path).read_bytes() == (tiny_hf_dir / f.path).read_bytes()


def test_auto_skips_a_source_that_is_down(tiny_hf_dir: Path, tmp_path: Path) -> None:
    with serve(tiny_hf_dir) as good:
        req = _card(tiny_hf_dir, {"kind": "https", "url": "http://127.0.0.1:9/"},
                    {"kind": "https", "url": good.url})
        fetch(req, tmp_path / "m")
    assert {f.source for f in Manifest.load(tmp_path / "m").files} == {
        good.url + f.path for f in Manifest.load(tiny_hf_dir).files}


def test_source_option_restricts_and_orders(tiny_hf_dir: Path, tmp_path: Path) -> None:
    with serve(tiny_hf_dir) as a:
        req = _card(tiny_hf_dir, {"kind": "builtin", "generator": "tiny", "seed": 0},
                    {"kind": "https", "url": a.url})
        fetch(req, tmp_path / "m", source="https")
    assert {f.source.split("/")[2] for f in Manifest.load(tmp_path / "m").files if f.source} == {
        a.url.split("/")[2]}


def test_a_card_with_an_hf_source_then_https(hub_root: Path, tiny_hf_dir: Path, pki: Pki,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a card that pins no digest takes the listing of a mirror only over https (over http it
    # is refused: tests/fetch/test_hub_listing_trust.py)
    from huggingface_hub.utils import close_session

    mirror = MirrorServer(hub_root, tls=Tls(pki.cert, pki.key))
    mirror.start()
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    close_session()  # huggingface_hub keeps one client per process: the next one reads SSL_CERT_FILE
    card = parse_card({
        "name": "tiny-on-hub", "license": "Apache-2.0", "default_layout": "hf",
        "layouts": {"hf": {"files": None, "optional": ["*.bin"]}},
        "architecture": {"dim": 8, "n_layers": 1, "head_dim": 4, "hidden_dim": 8, "n_heads": 2,
                         "n_kv_heads": 1, "norm_eps": 1e-5, "vocab_size": 10},
        "sources": [{"kind": "hf", "repo": "weightship/tiny"}, {"kind": "https", "url": "http://127.0.0.1:9/"}],
    }, "test")
    try:
        fetch(FetchRequest(ref="tiny-on-hub", card=card, options=FAST), tmp_path / "m")
    finally:
        mirror.stop()
        close_session()
    m = Manifest.load(tmp_path / "m")
    assert m.name == "tiny-on-hub" and m.source is not None and m.source.kind == "hf"
    assert {f.path for f in m.files} == {f.path for f in Manifest.load(tiny_hf_dir).files}
    assert all(f.source and f.source.startswith("hf://weightship/tiny@") for f in m.files)
