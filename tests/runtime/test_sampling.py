"""The sampler's draws follow the distribution temperature, top-k and top-p define.

Thousands of rows with the same logits and their own seeds are drawn in one batched call, and
their frequencies are held against the distribution computed here the plain way (sort, cut,
renormalise). Four standard deviations of a frequency over 20 000 draws is under 0.015.
"""

from __future__ import annotations

import pytest
import torch

from weightship.runtime import sampling
from weightship.runtime.sampling import Sampler, SamplingParams, sample_rows

DRAWS = 20_000


def _expected(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    probs = (logits / p.temperature).softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    if p.top_k > 0:
        sorted_p[p.top_k :] = 0.0
    sorted_p /= sorted_p.sum()
    sorted_p[sorted_p.cumsum(-1) - sorted_p >= p.top_p] = 0.0  # the smallest set holding top_p
    return torch.zeros_like(probs).scatter_(0, order, sorted_p / sorted_p.sum())


def _frequencies(logits: torch.Tensor, params: list[SamplingParams]) -> list[torch.Tensor]:
    """One batched call: DRAWS rows per parameter set, interleaved, each with its own seed."""
    rows = [params[i % len(params)] for i in range(DRAWS * len(params))]
    samplers = [Sampler(SamplingParams(**{**vars(p), "seed": i}), logits.shape[0], torch.device("cpu"))
                for i, p in enumerate(rows)]
    tokens = torch.tensor(sample_rows(logits.expand(len(rows), -1), list(range(len(rows))), samplers))
    return [torch.bincount(tokens[i :: len(params)], minlength=logits.shape[0]) / DRAWS
            for i in range(len(params))]


# distinct values (no ties at a nucleus' edge): 12 spread out, then a tail of 52 close together
LOGITS = torch.tensor([2.0, 1.6, 1.5, 0.9, 0.4, 0.3, 0.0, -0.2, -0.9, -1.5, -3.0, -8.0]
                      + [-2.0 - 0.01 * i for i in range(52)])


@pytest.mark.parametrize("candidates", [1024, 4], ids=["whole", "nucleus past the candidates"])
def test_draws_follow_temperature_top_k_and_top_p(monkeypatch: pytest.MonkeyPatch, candidates: int) -> None:
    """Plain temperature, top-k, top-p, and both, mixed in one batch. With 4 candidates, the
    top-p rows' nuclei (of 3 and 46 tokens) fit in them or must be drawn again whole."""
    monkeypatch.setattr(sampling, "_CANDIDATES", candidates)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0, top_p=0.95),
              SamplingParams(temperature=0.9, top_k=4, top_p=0.7)]
    for p, got in zip(params, _frequencies(LOGITS, params), strict=True):
        want = _expected(LOGITS, p)
        assert (got - want).abs().max().item() < 0.015, (p, got[:8], want[:8])
        assert got[want == 0].sum().item() == 0.0  # nothing outside top-k and the nucleus, ever


def test_top_p_keeps_the_smallest_set_that_reaches_it() -> None:
    """Two tokens of probability 0.5 each and top_p 0.5: the first alone holds 0.5, so only the
    first is ever drawn (both, if the cut came one token late)."""
    logits = torch.tensor([0.0, 0.0, -50.0])
    samplers = [Sampler(SamplingParams(top_p=0.5, seed=i), 3, torch.device("cpu")) for i in range(200)]
    assert len(set(sample_rows(logits.expand(200, -1), list(range(200)), samplers))) == 1


def test_a_penalty_moves_the_greedy_choice_of_its_row_only() -> None:
    counts = [0, 3, 0]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, frequency_penalty=1.0),
              SamplingParams(temperature=0.0, presence_penalty=2.0)]
    samplers = [Sampler(p, LOGITS.shape[0], torch.device("cpu")) for p in params]
    for sampler, n in zip(samplers, counts, strict=True):
        for _ in range(n):
            sampler.observe(0)  # the favourite token, generated n times
    samplers[2].observe(0)
    got = sample_rows(LOGITS.expand(3, -1), [0, 1, 2], samplers)
    assert got == [0, 1, 1]  # 2.0 - 3 * 1.0 and 2.0 - 2.0 fall below the runner-up's 1.6
