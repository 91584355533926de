"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with penalties
and logit biases.

Each request samples with its own ``torch.Generator``, seeded from the request's ``seed`` when
it has one, so a seeded request draws the same tokens whatever else shares its batch. Draws are
inverse-CDF: one uniform number per token from the request's generator, and the first token
whose cumulative probability reaches it. Every row that samples in a step is processed in the
same few batched operations (one sort for all the rows' top-k and top-p).
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
    # (token, bias) added to the token's logit, with the penalties, before a token is chosen
    # (OpenAI's logit_bias): -100 bans it, +100 all but forces it. Token ids are checked against
    # the vocabulary by the engine.
    logit_bias: tuple[tuple[int, float], ...] = ()
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
        if any(not _is_int(t) or t < 0 or not -100.0 <= b <= 100.0 for t, b in self.logit_bias):
            raise bad("logit_bias", "must map token ids to biases from -100 to 100")
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s or len(s) > 256 for s in self.stop):
            raise bad("stop", "must be at most 8 non-empty strings of at most 256 characters")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        """The most likely token, after the penalties and biases: nothing drawn."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: batched with every other such row, no per-row work."""
        return self.greedy and not self.penalized and not self.logit_bias

    @property
    def truncated(self) -> bool:
        """Whether top-k or top-p leaves tokens out of the draw."""
        return self.top_k > 0 or self.top_p < 1.0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Sampler:
    """The per-request sampling state: a random stream and the counts penalties need.

    The stream is a CPU generator seeded from the request (one uniform number per sampled
    token), so a seeded request draws the same tokens whatever shares its batch, on any device.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device) -> None:
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        self.counts = torch.zeros(vocab_size, device=device) if params.penalized else None
        self.bias: torch.Tensor | None = None  # [V]
        if params.logit_bias:
            tokens, biases = zip(*params.logit_bias, strict=True)
            self.bias = torch.zeros(vocab_size, device=device).index_put_(
                (torch.tensor(tokens, device=device),), torch.tensor(biases, device=device))

    def observe(self, token: int) -> None:
        """Record a generated token (for the penalties)."""
        if self.counts is not None:
            self.counts[token] += 1

    def uniform(self) -> float:
        """The next number of this request's stream, in (0, 1]."""
        return 1.0 - float(torch.rand((), generator=self.generator))


def sample_rows(logits: torch.Tensor, rows: list[int], samplers: list[Sampler],
                greedy: torch.Tensor | None = None) -> list[int]:
    """The next token of each row in ``rows`` of ``logits`` [B, V], one host sync in all.

    ``greedy`` [B] is ``logits.argmax(-1)`` when the caller has it already (a decode step
    computes it inside its CUDA graph). The rows that sample are processed together, a few
    batched operations for all of them rather than a sequence per row.
    """
    if greedy is None:
        greedy = logits.argmax(-1)  # [B]
    if all(s.params.plain_greedy for s in samplers):  # the common case: no index upload
        best: list[int] = greedy.tolist()
        return [best[r] for r in rows]
    device = logits.device
    chosen = greedy.index_select(0, torch.tensor(rows, device=device))  # [n]: right for plain greedy
    todo = [i for i, s in enumerate(samplers) if not s.params.plain_greedy]
    x = logits[[rows[i] for i in todo]].float()  # [m, V], a copy
    for j, i in enumerate(todo):
        p, counts, bias = samplers[i].params, samplers[i].counts, samplers[i].bias
        if counts is not None:
            x[j] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if bias is not None:
            x[j] += bias
    params = [samplers[i].params for i in todo]
    drawn = x.argmax(-1)  # [m]: right for greedy rows with penalties or biases
    sampled = [j for j, p in enumerate(params) if not p.greedy]
    if sampled:
        uniforms = [samplers[todo[j]].uniform() for j in sampled]
        drawn[sampled] = _draw(x[sampled], [params[j] for j in sampled], uniforms)
    chosen[todo] = drawn
    tokens: list[int] = chosen.tolist()
    for token, sampler in zip(tokens, samplers, strict=True):
        sampler.observe(token)
    return tokens


# top-p without top-k looks for its nucleus among this many most likely tokens first, which a
# language model's nucleus nearly always fits in; a row whose nucleus does not is sorted whole.
_CANDIDATES = 1024


def _draw(x: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
    """One token per row of logits ``x`` [m, V] by temperature, top-k and top-p: inverse-CDF
    sampling with the rows' ``uniforms`` in (0, 1]."""
    device = x.device
    temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)  # [m, 1]
    probs = (x / temperature).softmax(-1)  # [m, V]
    u = torch.tensor(uniforms, device=device).unsqueeze(1)  # [m, 1]
    out = torch.empty(len(params), dtype=torch.long, device=device)
    whole = [j for j, p in enumerate(params) if not p.truncated]
    cut = [j for j, p in enumerate(params) if p.truncated]
    if whole:  # the whole vocabulary
        out[whole] = _inverse_cdf(probs[whole], u[whole]).squeeze(1)
    if cut:
        out[cut] = _truncated(probs[cut], [params[j] for j in cut], u[cut], _CANDIDATES)
    return out


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``weights`` [m, W] (unnormalised, >= 0), the index [m, 1] where the running sum
    first reaches ``u`` [m, 1] of the row's total: index i with probability weights[i] / total,
    never a zero-weight index (``u`` is in (0, 1])."""
    cdf = weights.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=weights.shape[1] - 1)


def _truncated(probs: torch.Tensor, params: list[SamplingParams], u: torch.Tensor,
               candidates: int) -> torch.Tensor:
    """Top-k, then top-p on what top-k kept (renormalised), then a draw: over the most likely
    ``candidates`` tokens of each row (or its top_k), a row's nucleus past them again whole."""
    device, vocab = probs.device, probs.shape[1]
    k = [p.top_k if p.top_k > 0 else vocab for p in params]
    width = min(vocab, max(min(ki, candidates) if p.top_k <= 0 else ki for ki, p in zip(k, params, strict=True)))
    top, order = probs.topk(width, dim=-1)  # [m, W] each, most likely first
    top = top.masked_fill(torch.arange(width, device=device) >= torch.tensor(k, device=device).unsqueeze(1), 0.0)
    mass = top.cumsum(-1)  # [m, W]
    # the mass top-p is a share of: what top-k kept, or the whole distribution (1) without top-k
    total = torch.where(torch.tensor([p.top_k > 0 for p in params], device=device), mass[:, -1], 1.0)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    # the smallest set holding top_p of the mass: a token stays while the tokens before it hold
    # less (the first always)
    top = top.masked_fill(mass - top >= (top_p * total).unsqueeze(1), 0.0)
    out = order.gather(1, _inverse_cdf(top, u)).squeeze(1)
    if width < vocab:  # a nucleus that may reach past the candidates: that row again, whole
        held: list[float] = mass[:, -1].tolist()
        past = [j for j, p in enumerate(params) if p.top_k <= 0 and held[j] < p.top_p]
        if past:
            out[past] = _truncated(probs[past], [params[j] for j in past], u[past], vocab)
    return out
