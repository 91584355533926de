"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with penalties.

Each request samples with its own ``torch.Generator``, seeded from the request's ``seed`` when
it has one, so a seeded request draws the same tokens whatever else shares its batch. Draws use
the exponential-race trick (gpt-fast's ``multinomial_sample_one_no_sync``): ``argmax(p / q)``
with ``q ~ Exp(1)`` picks index ``i`` with probability ``p_i`` and needs no host round trip.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from weightship.errors import InvalidRequestError

MAX_TOP = 20  # alternatives per token a request may ask log-probabilities of (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses tokens and when it stops (OpenAI's parameters)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability ≥ top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop before any of these strings; they are not returned
    presence_penalty: float = 0.0  # subtracted once from a token that has been generated
    frequency_penalty: float = 0.0  # subtracted per time a token has been generated
    ignore_eos: bool = False  # keep going past </s> (benchmarks)
    # Log-probabilities (runtime.logprobs): of each generated token with this many alternatives,
    # and of each prompt token (OpenAI's ``echo``); None = not wanted.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {why}, got {getattr(self, param)!r}", param=param)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be a positive integer")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (off) or a positive integer")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be between -2 and 2")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be an integer in [0, 2**63)")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not _is_int(n) or not 0 <= n <= MAX_TOP):
                raise bad(name, f"must be an integer from 0 to {MAX_TOP}")
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s or len(s) > 256 for s in self.stop):
            raise bad("stop", "must be at most 8 non-empty strings of at most 256 characters")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: batched with every other such row, no per-row work."""
        return (self.temperature == 0.0 or self.top_k == 1) and not self.penalized


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Sampler:
    """The per-request sampling state: a generator and the counts penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        self.counts = torch.zeros(vocab_size, device=device) if params.penalized else None

    def observe(self, token: int) -> None:
        """Record a generated token (for the penalties)."""
        if self.counts is not None:
            self.counts[token] += 1

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token (a 0-d tensor on the logits' device) from one row of logits [V]."""
        p = self.params
        x = logits.float().clone()  # [V]
        if self.counts is not None:
            x -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()
        if p.temperature == 0.0 or p.top_k == 1:
            return x.argmax()
        x /= p.temperature
        if p.top_k > 0 and p.top_k < x.shape[0]:
            kth = torch.topk(x, p.top_k).values[-1]
            x[x < kth] = float("-inf")
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)  # [V] each
            probs = sorted_x.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # tokens after the nucleus is complete
            sorted_x[drop] = float("-inf")
            x = torch.empty_like(x).scatter_(0, order, sorted_x)
        probs = x.softmax(-1)
        race = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        return (probs / race).argmax()


def sample_rows(logits: torch.Tensor, rows: list[int], samplers: list[Sampler],
                greedy: torch.Tensor | None = None) -> list[int]:
    """The next token of each row in ``rows`` of ``logits`` [B, V], one host sync in all.

    ``greedy`` [B] is ``logits.argmax(-1)`` when the caller has it already (a decode step
    computes it inside its CUDA graph).
    """
    if greedy is None:
        greedy = logits.argmax(-1)  # [B]
    if all(s.params.plain_greedy for s in samplers):  # the common case: no index upload
        best: list[int] = greedy.tolist()
        return [best[r] for r in rows]
    index = torch.tensor(rows, device=logits.device)
    chosen = greedy.index_select(0, index)  # [n]: right for the plain greedy rows
    for i, (row, sampler) in enumerate(zip(rows, samplers, strict=True)):
        if not sampler.params.plain_greedy:
            chosen[i] = sampler.draw(logits[row])
    tokens: list[int] = chosen.tolist()
    for token, sampler in zip(tokens, samplers, strict=True):
        sampler.observe(token)
    return tokens
