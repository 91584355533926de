"""The model against transformers' MistralForCausalLM on the same tiny weights (float32, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.runtime.conftest import hf_logprobs
from weightship.catalog.architecture import Architecture
from weightship.catalog.tiny import hf_tensors, safetensors_bytes
from weightship.errors import CatalogError, MalformedWeightsError
from weightship.runtime.cache import KVCache
from weightship.runtime.engine import Engine, EngineConfig
from weightship.runtime.loader import load_model
from weightship.runtime.model import Transformer
from weightship.runtime.sampling import SamplingParams

TOL = 1e-4
WINDOW = 32  # the tiny model's sliding window; every prompt below is longer


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 32000, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers_past_the_window(tiny_model: Transformer, hf_model: torch.nn.Module) -> None:
    tokens = _tokens(2, 3 * WINDOW + 5)
    ours = tiny_model(tokens)
    theirs = hf_model(tokens).logits
    assert ours.shape == theirs.shape == (2, 3 * WINDOW + 5, 32000)
    assert (ours - theirs).abs().max().item() < TOL


def test_original_layout_loads_the_same_model(tiny_original_dir: Path, tiny_model: Transformer) -> None:
    """The original layout has wq/wk un-permuted: the loader must give identical logits."""
    original, files = load_model(tiny_original_dir, device="cpu", dtype="float32", max_model_len=512)
    assert files.layout == "original"
    tokens = _tokens(1, 2 * WINDOW, seed=1)
    assert (original(tokens) - tiny_model(tokens)).abs().max().item() < 1e-5


@pytest.mark.parametrize("chunk", [7, 32, 100])
def test_chunked_prefill_and_decode_match_full_scoring(tiny_model: Transformer, chunk: int) -> None:
    """Cached logits (prefill in chunks, then decode steps) equal scoring without a cache."""
    tokens = _tokens(1, 90, seed=2)[0]
    full = tiny_model(tokens.unsqueeze(0))[0]  # [90, V]
    cache = KVCache(tiny_model.args, "cpu", torch.float32)
    slot, prompt_len = 3, 70
    got = [tiny_model.prefill(tokens[s : min(s + chunk, prompt_len)], s, slot, cache, all_logits=True)
           for s in range(0, prompt_len, chunk)]
    for p in range(prompt_len, 90):
        # the other rows are idle slots fed garbage; they must not disturb row 3
        toks = torch.tensor([5, 6, 7, int(tokens[p])])
        pos = torch.tensor([0, 0, 0, p])
        got.append(tiny_model.decode(toks, pos, cache, kv_len=cache.cache_len)[slot : slot + 1])
    assert (torch.cat(got) - full).abs().max().item() < TOL


def test_packed_prefill_equals_one_prompt_at_a_time(tiny_model: Transformer) -> None:
    """Prompts packed into one pass (one past the window) score and fill their slots exactly as
    each does alone: the same logits, then the same decode step from either cache."""
    prompts = [_tokens(1, n, seed=10 + n)[0] for n in (5, WINDOW + 8, 17)]
    slots = [2, 0, 5]
    packed, alone = (KVCache(tiny_model.args, "cpu", torch.float32) for _ in range(2))
    every = tiny_model.prefill_packed(prompts, slots, packed, all_logits=True)  # [N, V]
    last = tiny_model.prefill_packed(prompts, slots, packed)  # [3, V]; the same again
    for i, (p, slot) in enumerate(zip(prompts, slots, strict=True)):
        one = tiny_model.prefill(p, 0, slot, alone, all_logits=True)  # [n, V]
        assert (one - tiny_model(p.unsqueeze(0))[0]).abs().max().item() < TOL
        start = sum(len(q) for q in prompts[:i])
        assert (every[start : start + len(p)] - one).abs().max().item() < TOL
        assert (last[i] - one[-1]).abs().max().item() < TOL
    assert torch.equal(packed.pos, alone.pos)
    toks, pos = torch.tensor([7, 0, 7, 0, 0, 7]), torch.tensor([WINDOW + 8, 0, 5, 0, 0, 17])
    steps = [tiny_model.decode(toks, pos, cache, kv_len=cache.cache_len)[slots] for cache in (packed, alone)]
    assert (steps[0] - steps[1]).abs().max().item() < TOL


def test_an_idle_row_writes_no_nan_even_where_attention_to_nothing_is_nan(
        tiny_model: Transformer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle decode rows (position -1) with an attention that, like some GPU kernels, is NaN for a
    row that sees no key: their keys stay finite, so no later reader of the entry is poisoned."""

    def naive_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                   enable_gqa: bool = False) -> torch.Tensor:
        if enable_gqa:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + attn_mask
        return scores.softmax(-1) @ v  # all -inf: NaN

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", naive_sdpa)
    cache = KVCache(tiny_model.args, "cpu", torch.float32)
    prompt = _tokens(1, 12, seed=8)[0]
    tiny_model.prefill(prompt, 0, 1, cache)
    for step in range(3):  # rows 0 and 2 idle, row 1 decoding
        toks, pos = torch.tensor([0, 7, 0]), torch.tensor([-1, 12 + step, -1])
        logits = tiny_model.decode(toks, pos, cache, kv_len=cache.cache_len)
        assert logits[1].isfinite().all()
    assert all(t.isfinite().all() for t in (*cache.k, *cache.v))


def test_greedy_32_tokens_identical_to_transformers(tiny_model: Transformer, hf_model: torch.nn.Module,
                                                    engine: object) -> None:
    from weightship.runtime.engine import Engine
    from weightship.runtime.sampling import SamplingParams

    assert isinstance(engine, Engine)
    prompt = _tokens(1, WINDOW + 13, seed=3)[0].tolist()
    ours = engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False)[0, len(prompt):].tolist()
    assert ours.token_ids == theirs
    assert len(set(theirs)) > 4  # the comparison means something: not one token repeated


def test_generation_with_cache_equals_rescoring(tiny_model: Transformer, engine: object) -> None:
    """Every greedy token is the argmax of re-scoring the whole sequence without a cache."""
    from weightship.runtime.engine import Engine
    from weightship.runtime.sampling import SamplingParams

    assert isinstance(engine, Engine)
    prompt = _tokens(1, 20, seed=4)[0].tolist()
    out = engine.generate(prompt, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    seq = torch.tensor([prompt + out.token_ids])
    rescored = tiny_model(seq)[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert rescored == out.token_ids


def test_prompt_and_answer_logprobs_are_transformers(tiny_model: Transformer,
                                                     hf_model: torch.nn.Module) -> None:
    """What ``echo`` and ``logprobs`` report: every prompt token's log-probability (across
    prefill chunks, past the window), then each generated token's with its top alternatives."""
    engine = Engine(tiny_model, None, EngineConfig(prefill_chunk=16))
    prompt = _tokens(1, WINDOW + 20, seed=7)[0].tolist()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = engine.generate(prompt, params)
    ref = hf_logprobs(hf_model, prompt + out.token_ids)  # [T, V]: row p scores token p + 1
    assert [e.token for e in out.prompt_logprobs] == prompt
    assert out.prompt_logprobs[0].logprob is None  # nothing predicts the first token
    assert [e.token for e in out.logprobs] == out.token_ids
    for pos, e in enumerate([*out.prompt_logprobs[1:], *out.logprobs]):  # scored by row pos
        assert e.logprob is not None and abs(e.logprob - ref[pos, e.token].item()) < TOL, pos
        best = ref[pos].topk(len(e.top)).values.tolist()
        assert len(e.top) == (2 if pos < len(prompt) - 1 else 3)
        assert all(abs(v - ref[pos, t].item()) < TOL and abs(v - b) < TOL
                   for (t, v), b in zip(e.top, best, strict=True)), pos
    assert all(e.top[0][0] == e.token for e in out.logprobs)  # greedy: the most likely token


def test_loader_refuses_a_directory_with_only_pickles(tiny_original_dir: Path, tmp_path: Path) -> None:
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        shutil.copy(tiny_original_dir / name, tmp_path / name)
    with pytest.raises(CatalogError, match="no safetensors") as e:
        load_model(tmp_path, device="cpu")
    assert e.value.hint is not None and "convert" in e.value.hint


def test_loader_rejects_a_wrong_shape(tiny_hf_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(tiny_hf_dir / name, tmp_path / name)
    arch = Architecture.from_hf_config(json.loads((tiny_hf_dir / "config.json").read_text()))
    tensors = hf_tensors(arch, seed=20231027)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:64]
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    with pytest.raises(MalformedWeightsError, match=r"norm\.weight"):
        load_model(tmp_path, device="cpu")
