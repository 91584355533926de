"""Weights from safetensors into the model with one copy: bit for bit the tensors of the old
path (``safe_open`` → ``.to(dtype)`` → index the HF rows back → ``torch.cat`` to fuse), from the
mapped file on the CPU and through the staging ring CUDA uses (run here on the CPU)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from weightship.catalog.architecture import hf_to_original_name, permute_for_hf_rows
from weightship.errors import MalformedWeightsError
from weightship.runtime.layers import adjacent_rows
from weightship.runtime.loader import ModelFiles, find_files, load_model
from weightship.runtime.weights import load_mapped, load_staged, load_weights, plan_sources


def old_path(files: ModelFiles, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the loader did before: each tensor read, un-permuted by indexing, converted; then
    ``wq``/``wk``/``wv`` and ``w1``/``w3`` concatenated."""
    state: dict[str, torch.Tensor] = {}
    for path in files.weights:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                if files.layout == "hf":
                    name = hf_to_original_name(name)
                    if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                        heads = files.arch.n_heads if name.endswith("wq.weight") else files.arch.n_kv_heads
                        out = torch.empty_like(tensor)
                        out[torch.tensor(permute_for_hf_rows(tensor.shape[0], heads))] = tensor
                        tensor = out
                state[name] = tensor.to(dtype)
    for i in range(files.arch.n_layers):
        p = f"layers.{i}."
        state[p + "wqkv"] = torch.cat([state[p + f"attention.w{x}.weight"] for x in "qkv"])
        state[p + "w13"] = torch.cat([state[p + f"feed_forward.w{x}.weight"] for x in "13"])
    return state


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def assert_same_as_old(files: ModelFiles, dtype: torch.dtype, state: dict[str, torch.Tensor]) -> None:
    want = old_path(files, dtype)
    for i in range(files.arch.n_layers):  # the parts of each fused matrix lie back to back
        p = f"layers.{i}."
        qkv = adjacent_rows([state[p + f"attention.w{x}.weight"] for x in "qkv"])
        w13 = adjacent_rows([state[p + f"feed_forward.w{x}.weight"] for x in "13"])
        assert qkv is not None and w13 is not None, i
        assert same_bits(qkv, want.pop(p + "wqkv")) and same_bits(w13, want.pop(p + "w13")), i
    assert set(state) == set(want)
    different = [n for n in want if not same_bits(state[n], want[n])]
    assert not different, different


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mapped_weights_are_the_old_paths_bit_for_bit(layout: str, dtype: torch.dtype,
                                                      tiny_hf_dir: Path, tiny_original_dir: Path) -> None:
    files = find_files(tiny_hf_dir if layout == "hf" else tiny_original_dir)
    state = load_weights(files.weights, files.layout, files.arch, dtype, torch.device("cpu"))
    assert_same_as_old(files, dtype, state)
    size = files.weights[0].stat().st_size
    mapped = [n for n, t in state.items() if t.untyped_storage().nbytes() == size]
    if dtype == torch.bfloat16:  # stored as bf16: what needs no un-permuting is the file itself
        assert "tok_embeddings.weight" in mapped and "layers.0.attention.wo.weight" in mapped
        assert ("layers.0.feed_forward.w1.weight" in mapped) == (layout == "hf")  # gate, up adjacent
        assert "layers.0.attention.wq.weight" not in mapped
    else:
        assert not mapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_weights_are_the_old_paths_bit_for_bit(dtype: torch.dtype, tiny_hf_dir: Path) -> None:
    """The ring CUDA reads through, with chunks far smaller than the tensors (a tensor spans
    many chunks, a chunk boundary falls inside rows, the ring wraps many times)."""
    files = find_files(tiny_hf_dir)
    sources = plan_sources(files.weights, files.layout, files.arch)
    state = load_staged(sources, dtype, torch.device("cpu"), chunk=40_000, ring=3, readers=2)
    assert_same_as_old(files, dtype, state)


def test_a_misaligned_file_loads_the_same(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """A header whose length is not a multiple of 8 (writers pad it; the format does not say
    they must) leaves every tensor at an odd offset: copied, never viewed in place."""
    data = (tiny_hf_dir / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), separators=(",", ":")).encode() + b" "
    assert len(header) % 2 == 1
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(tiny_hf_dir / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])
    files = find_files(tmp_path)
    for dtype in (torch.bfloat16, torch.float32):
        state = load_mapped(plan_sources(files.weights, files.layout, files.arch), dtype)
        assert_same_as_old(find_files(tiny_hf_dir), dtype, state)


def test_a_truncated_file_is_refused(tiny_hf_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(tiny_hf_dir / name, tmp_path / name)
    data = (tiny_hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 4096])
    with pytest.raises(MalformedWeightsError, match=r"model\.safetensors"):
        load_model(tmp_path, device="cpu")


def test_the_fused_projections_cost_no_copy(tiny_hf_dir: Path) -> None:
    """The model's fused matrices are the loaded tensors themselves (before: a second copy)."""
    model, _ = load_model(tiny_hf_dir, device="cpu", dtype="float32", max_model_len=64)
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert attn.wqkv is not None and ffn.w13 is not None
    assert attn.wqkv.data_ptr() == attn.wq.weight.data_ptr()
    assert ffn.w13.data_ptr() == ffn.w1.weight.data_ptr()
    assert attn.wv.weight.data_ptr() + attn.wv.weight.nbytes == attn.wqkv.data_ptr() + attn.wqkv.nbytes
