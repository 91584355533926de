"""The model catalog and the embedded tiny model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from weightship.catalog import list_cards, load_card
from weightship.catalog.architecture import Architecture, hf_to_original_name, permute_for_hf_rows
from weightship.catalog.tiny import hf_tensors, original_tensors, tiny_files
from weightship.errors import CatalogError

DESIGN_INFOHASH = "208b101a0f51514ecf285885a8b0f6fb1a1e4d7d"
DESIGN_TOKENIZER_SHA = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def test_models_json_lists_every_card() -> None:
    r = run_cli("models", "--json")
    assert r.code == 0, r.stderr
    names = {m["name"] for m in json.loads(r.stdout)}
    assert {"mistral-7b-v0.1", "mistral-7b-instruct-v0.1", "mistral-7b-instruct-v0.2",
            "weightship-tiny"} <= names


def test_mistral_card_matches_published_facts() -> None:
    r = run_cli("models", "show", "mistral-7b-v0.1", "--json")
    assert r.code == 0, r.stderr
    card = json.loads(r.stdout)
    sizes = {f["path"]: f.get("size") for f in card["layouts"]["hf"]["files"]}
    assert sum(v for k, v in sizes.items() if k.endswith(".safetensors")) == 14_483_498_040
    assert card["layouts"]["original"]["torrent"]["infohash"] == DESIGN_INFOHASH
    assert card["layouts"]["original"]["tarball"]["md5"] == "37dab53973db2d56b2da0a033a15307f"
    assert card["tokenizer"]["sha256"] == DESIGN_TOKENIZER_SHA
    assert card["parameters"] == 7_241_732_096
    # Nothing unpublished is pinned: only the tokenizer carries a sha256.
    pinned = [f["path"] for lay in card["layouts"].values() for f in lay["files"] if f.get("sha256")]
    assert set(pinned) == {"tokenizer.model"}


def test_instruct_v02_has_its_own_rope_and_no_window() -> None:
    arch = load_card("mistral-7b-instruct-v0.2").architecture
    assert arch.rope_theta == 1_000_000.0 and arch.sliding_window is None


def test_unknown_model_is_a_usage_error() -> None:
    r = run_cli("models", "show", "llama-9000")
    assert r.code == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_tiny_architecture_exercises_gqa_and_window() -> None:
    arch = load_card("weightship-tiny").architecture
    assert arch.n_kv_heads < arch.n_heads
    assert arch.sliding_window is not None and arch.sliding_window < 64
    assert 64 <= arch.dim <= 128 and 2 <= arch.n_layers <= 4


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_tiny_generator_reproduces_the_pinned_digests(layout: str) -> None:
    card = load_card("weightship-tiny")
    files = tiny_files(card.architecture, int(card.sources[0]["seed"]), layout)
    pinned = {f.path: (f.size, f.sha256) for f in card.layout(layout).files or ()}
    actual = {p: (len(b), hashlib.sha256(b).hexdigest()) for p, b in files.items()}
    assert actual == pinned


def test_tiny_tokenizer_is_mistral_v1() -> None:
    card = load_card("weightship-tiny")
    assert card.tokenizer is not None and card.tokenizer.sha256 == DESIGN_TOKENIZER_SHA


def test_hf_layout_is_the_original_with_rotary_rows_permuted() -> None:
    card = load_card("weightship-tiny")
    arch, seed = card.architecture, int(card.sources[0]["seed"])
    orig, hf = original_tensors(arch, seed), hf_tensors(arch, seed)
    for name, bits in hf.items():
        o = orig[hf_to_original_name(name)]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = arch.n_heads if "q_proj" in name else arch.n_kv_heads
            assert not np.array_equal(bits, o)
            assert np.array_equal(bits, o[permute_for_hf_rows(o.shape[0], heads)])
        else:
            assert np.array_equal(bits, o), name


def test_tiny_pth_loads_with_torch_weights_only_mmap(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    card = load_card("weightship-tiny")
    files = tiny_files(card.architecture, int(card.sources[0]["seed"]), "original")
    (tmp_path / "c.pth").write_bytes(files["consolidated.00.pth"])
    sd = torch.load(tmp_path / "c.pth", weights_only=True, mmap=True)
    assert set(sd) == set(card.architecture.tensor_shapes("original"))
    wq = sd["layers.0.attention.wq.weight"]
    assert wq.dtype == torch.bfloat16 and tuple(wq.shape) == (128, 128)
    assert torch.isfinite(wq.float()).all() and wq.float().std() > 0.01


def test_architecture_rejects_nonsense() -> None:
    with pytest.raises(CatalogError, match="multiple"):
        Architecture(dim=64, n_layers=1, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=3,
                     norm_eps=1e-5, vocab_size=10)
    with pytest.raises(CatalogError, match="positive"):
        Architecture(dim=0, n_layers=1, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                     norm_eps=1e-5, vocab_size=10)


def test_cards_parse() -> None:
    for card in list_cards():
        assert card.layout().name == card.default_layout
        assert card.sources, card.name
