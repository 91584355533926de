"""The decode attention formulations (attention.py): the same greedy tokens as the default in
float32, eagerly and in the compiled step, and the same numbers to rounding on random inputs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from weightship.errors import UsageError
from weightship.runtime import attention
from weightship.runtime.engine import Engine, EngineConfig
from weightship.runtime.model import Transformer
from weightship.runtime.sampling import SamplingParams


@pytest.fixture
def kernel(tiny_model: Transformer) -> Iterator[None]:
    yield
    tiny_model.set_decode_attention("sdpa")


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(16)
    return [[1, *torch.randint(3, 32000, (n,), generator=g).tolist()] for n in (5, 40, 90)]


def _greedy(engine: Engine) -> list[list[int]]:
    # batches of 1..3 rows, past the tiny model's sliding window: cache entries wrap
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    ids = []
    out: dict[str, list[int]] = {}
    for p in _prompts():
        ids.append(engine.submit(p, params, lambda o: out.setdefault(o.request_id, []).extend(o.token_ids),
                                 detokenize=False))
        engine.step()
    while engine.step():
        pass
    return [out[i] for i in ids]


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("kind", ["matmul", "split"])
def test_each_formulation_gives_the_default_greedy_tokens(tiny_model: Transformer, kind: str) -> None:
    want = _greedy(Engine(tiny_model, None, EngineConfig(prefill_chunk=64)))
    tiny_model.set_decode_attention(kind)
    assert _greedy(Engine(tiny_model, None, EngineConfig(prefill_chunk=64))) == want


@pytest.mark.compiles
@pytest.mark.usefixtures("kernel")
def test_split_in_the_compiled_step_gives_the_default_greedy_tokens(tiny_model: Transformer) -> None:
    """As CUDA runs it: compiled, at cache lengths that are multiples of the partitions."""
    torch._dynamo.reset()
    want = _greedy(Engine(tiny_model, None, EngineConfig(prefill_chunk=64)))
    tiny_model.set_decode_attention("split")
    compiled = Engine(tiny_model, None, EngineConfig(prefill_chunk=64, use_graphs=False, compile_step=True))
    assert _greedy(compiled) == want
    assert compiled.runner._compiled is not None  # it did not fall back to eager
    torch._dynamo.reset()


@pytest.mark.parametrize("length", [256, 64, 37])
def test_the_numbers_agree_to_rounding(length: int) -> None:
    g = torch.Generator().manual_seed(length)
    q = torch.randn(3, 2, 4, 32, generator=g)  # [B, Hkv, G, D]
    cache = torch.randn(3, 2, 300, 32, generator=g)
    k, v = cache[:, :, :length], cache.flip(2)[:, :, :length]  # strided views, as from the cache
    mask = torch.zeros(3, 1, 1, length)
    mask[0, ..., length // 2 :] = float("-inf")  # a row that sees half the entries
    mask[1, ..., : length - 3] = float("-inf")  # one that sees only the last three (whole
    want = attention.sdpa(q, k, v, mask)  # partitions masked out)
    for kind in ("matmul", "split"):
        got = attention.decode_attention(kind, q, k, v, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_unknown_formulation_is_refused(tiny_model: Transformer) -> None:
    with pytest.raises(UsageError, match="unknown decode attention"):
        tiny_model.set_decode_attention("flash")
