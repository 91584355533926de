"""The decode roofline bench/runtime.py prints measured steps against, checked by hand."""

from __future__ import annotations

import pytest

from weightship.catalog.architecture import Architecture
from weightship.runtime.roofline import Roofline

MISTRAL_7B = Architecture(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32,
                          n_kv_heads=8, norm_eps=1e-5, vocab_size=32000, sliding_window=4096)


def test_mistral_7b_on_an_h200_by_hand() -> None:
    r = Roofline(MISTRAL_7B, dtype_bytes=2, bandwidth=4.8e12)
    assert r.weight_bytes == 14_483_464_192  # 7,241,732,096 parameters in bf16 (DESIGN.md: 14.48 GB)
    assert r.kv_bytes(1) == 2 * 32 * 8 * 128 * 2 == 131_072  # K and V, 32 layers, 8 heads of 128
    # one stream at 1024 positions: the weights and 128 MiB of cache, 3.045 ms
    assert r.step_seconds(1, 1024) == pytest.approx((14_483_464_192 + 1024 * 131_072) / 4.8e12)
    assert r.tokens_per_second(1, 1024) == pytest.approx(328.4, abs=0.1)
    # 64 streams: 8 GiB of cache on top of the weights, 4.807 ms a step, 13.3 k tokens/s
    assert r.step_bytes(64, 1024) == 14_483_464_192 + 64 * 1024 * 131_072
    assert r.tokens_per_second(64, 1024) == pytest.approx(13_315, abs=1)
    # the cache only ever holds the window: 8192 positions read as many bytes as 4096
    assert r.kv_bytes(8192) == r.kv_bytes(4096) == 4096 * 131_072
    # more streams never lower the throughput bound, but every stream's step gets longer
    rates = [r.tokens_per_second(n, 1024) for n in (16, 32, 64, 128)]
    assert rates == sorted(rates)
    steps = [r.step_seconds(n, 1024) for n in (16, 32, 64, 128)]
    assert steps == sorted(steps)


def test_without_a_sliding_window_the_whole_context_is_read() -> None:
    llama = Architecture(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                         norm_eps=1e-5, vocab_size=100)
    r = Roofline(llama, dtype_bytes=4, bandwidth=1e9)
    assert r.kv_bytes(10_000) == 2 * 2 * 2 * 16 * 10_000 * 4
    assert r.step_seconds(3, 100) == pytest.approx((llama.n_params * 4 + 3 * 2 * 2 * 2 * 16 * 100 * 4) / 1e9)
