"""The forward passes of an engine step: prefill the newcomers, then decode the running batch.

The engine (:mod:`weightship.runtime.engine`) schedules: it owns the KV-cache slots, admits and
cancels requests, and turns sampled tokens into outputs. Each step it hands its slots to a
:class:`Batcher`, which runs steps 3 and 4 of the engine's docstring:

3. prefill up to ``prefill_chunk`` prompt tokens of newcomers, oldest first: the prompts that fit
   whole in one packed forward pass together, a longer one a chunk at a time; then sample the
   first token of each prompt that is now read whole;
4. decode one token for every running request in one batched forward pass (row ``i`` is slot
   ``i``), or take the step launched ahead of time (``lookahead``) when it advanced the same rows.

Every sampled token goes back to the engine through ``accept``, with its log-probabilities when
the request asked for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from weightship.runtime.args import ModelArgs
from weightship.runtime.cache import KVCache
from weightship.runtime.decoding import DecodeRunner
from weightship.runtime.logprobs import TokenLogprob, log_probs, pick
from weightship.runtime.model import Transformer
from weightship.runtime.request import Request
from weightship.runtime.sampling import Sampler, sample_rows

# The engine's side: record ``token`` for the request (and its log-probabilities, if asked for).
Accept = Callable[[Request, int, TokenLogprob | None], None]
Slots = Sequence[Request | None]


@dataclass
class _Ahead:
    """A decode step launched before the engine knew the tokens it is fed (see ``lookahead``)."""

    ids: list[str]  # the requests of rows 0..n-1 it advances, one token past the step before
    logits: torch.Tensor  # [n, V]
    greedy: torch.Tensor  # [n]


class Batcher:
    """Runs the prefill and decode passes of a step over the engine's slots."""

    def __init__(self, model: Transformer, cache: KVCache, runner: DecodeRunner, args: ModelArgs, *,
                 prefill_chunk: int, lookahead: bool, accept: Accept) -> None:
        self.model = model
        self.cache = cache
        self.runner = runner
        self.args = args
        self.prefill_chunk = prefill_chunk
        self.lookahead = lookahead
        self.accept = accept
        self._ahead: _Ahead | None = None

    # ---- prefill ----------------------------------------------------------------------------

    def prefill(self, slots: Slots) -> bool:
        """Spend this step's prompt budget on the newcomers, oldest first: prompts that fit
        whole are packed into one forward pass; a longer one runs a chunk of its own."""
        newcomers = sorted((r for r in slots if r is not None and r.prefilled < len(r.prompt)),
                           key=lambda r: r.seq)
        whole, chunks = self._share_budget(newcomers)
        if whole:
            self._prefill_whole(whole)
        for r, n in chunks:
            self._prefill_chunk(r, n)
        return bool(newcomers)

    def _share_budget(self, newcomers: list[Request]) -> tuple[list[Request], list[tuple[Request, int]]]:
        """(the prompts read whole this step, (request, tokens) for those read a chunk of)."""
        budget = self.prefill_chunk
        whole: list[Request] = []
        chunks: list[tuple[Request, int]] = []
        for r in newcomers:
            if budget <= 0:
                break
            n = min(len(r.prompt) - r.prefilled, budget)
            if r.prefilled == 0 and n == len(r.prompt):
                whole.append(r)
            else:
                chunks.append((r, n))
            budget -= n
        return whole, chunks

    def _prefill_whole(self, whole: list[Request]) -> None:
        """Prefill whole prompts in one packed pass and sample their first tokens."""
        device = self.model.device
        echo = any(r.params.prompt_logprobs is not None for r in whole)
        logits = self.model.prefill_packed([torch.tensor(r.prompt, device=device) for r in whole],
                                           [r.slot for r in whole], self.cache, all_logits=echo)
        if echo:  # [N, V] packed: split per prompt, keep each one's last position
            parts = logits.split([len(r.prompt) for r in whole])
            for r, part in zip(whole, parts, strict=True):
                if r.params.prompt_logprobs is not None:
                    self._score_prompt(r, part)
            logits = torch.stack([part[-1] for part in parts])  # [S, V]
        for r in whole:
            r.prefilled = len(r.prompt)
        self._first_tokens(whole, logits)

    def _prefill_chunk(self, r: Request, n: int) -> None:
        """Prefill the next ``n`` prompt tokens of ``r``; sample its first token once all are read."""
        chunk = torch.tensor(r.prompt[r.prefilled : r.prefilled + n], device=self.model.device)
        echo = r.params.prompt_logprobs is not None
        logits = self.model.prefill(chunk, r.prefilled, r.slot, self.cache, all_logits=echo)
        if echo:  # [n, V]
            self._score_prompt(r, logits)
            logits = logits[-1]
        r.prefilled += n
        if r.prefilled == len(r.prompt):
            self._first_tokens([r], logits.unsqueeze(0))

    def _score_prompt(self, r: Request, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens that ``logits`` [n, V] of positions
        ``r.prefilled ..`` predict (position p's logits score token p + 1), for ``echo``."""
        k = r.params.prompt_logprobs
        assert k is not None
        if r.prefilled == 0:
            r.prompt_logprobs.append(TokenLogprob(r.prompt[0], None))  # nothing predicts it
        scored = r.prompt[r.prefilled + 1 : r.prefilled + logits.shape[0] + 1]
        r.prompt_logprobs += pick(log_probs(logits[: len(scored)]), scored, [k] * len(scored))

    def _first_tokens(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample the first token of each of ``reqs``, fully prefilled, from row i of ``logits`` [S, V]."""
        samplers = [Sampler(r.params, self.args.arch.vocab_size, self.model.device) for r in reqs]
        for r, sampler in zip(reqs, samplers, strict=True):
            r.sampler = sampler
        rows = list(range(len(reqs)))
        scored, lp = _logprob_rows(reqs, logits, rows)
        self._accept_all(reqs, sample_rows(logits, rows, samplers), scored, lp)

    # ---- decode -----------------------------------------------------------------------------

    def decode(self, slots: Slots) -> bool:
        """One token for every request that is decoding, in one batched pass."""
        active = [r for r in slots if r is not None and r.decoding]
        ahead, self._ahead = self._ahead, None
        if not active:
            return False
        n = self.runner.padded_batch(max(r.slot for r in active) + 1)
        if ahead is not None and ahead.ids == [r.id for r in active]:
            logits, greedy = ahead.logits, ahead.greedy  # already running: the same rows, one on
        else:  # (a discarded step ahead wrote only its own rows' next cache entries)
            logits, greedy = self.runner(*_step_inputs(slots, n))  # [n, V], [n]
        samplers = [r.sampler for r in active]
        assert all(s is not None for s in samplers), [r.id for r in active]
        # before a step is launched ahead: it overwrites the logits (its CUDA graph's output)
        scored, lp = _logprob_rows(active, logits, [r.slot for r in active])
        if self._can_launch_ahead(active, n):
            new, (next_logits, next_greedy) = self.runner.launch_next(greedy)
            self._ahead = _Ahead([r.id for r in active], next_logits, next_greedy)
        else:
            new = sample_rows(logits, [r.slot for r in active], samplers, greedy)  # type: ignore[arg-type]
        self._accept_all(active, new, scored, lp)
        return True

    def _can_launch_ahead(self, active: list[Request], n: int) -> bool:
        """Whether the next step's inputs follow from this one's on the device alone.

        Every row must be a request decoding greedily (no idle or half-prefilled rows), and none
        may reach its length limit with the token being chosen now.
        """
        if not self.lookahead or len(active) != n:
            return False
        limit = self.args.max_model_len
        return all(r.params.plain_greedy and len(r.output) + 1 < r.params.max_tokens
                   and len(r.prompt) + len(r.output) + 1 < limit for r in active)

    def _accept_all(self, reqs: list[Request], tokens: list[int], scored: list[int],
                    lp: torch.Tensor | None) -> None:
        """Accept ``tokens[i]`` for ``reqs[i]``; ``lp`` [len(scored), V] are the log-probabilities
        of the rows ``scored`` (the requests that asked for them)."""
        picked: dict[int, TokenLogprob] = {}
        if lp is not None:
            entries = pick(lp, [tokens[i] for i in scored], [reqs[i].params.logprobs or 0 for i in scored])
            picked = dict(zip(scored, entries, strict=True))
        for i, (r, token) in enumerate(zip(reqs, tokens, strict=True)):
            self.accept(r, token, picked.get(i))


def _logprob_rows(reqs: list[Request], logits: torch.Tensor,
                  rows: list[int]) -> tuple[list[int], torch.Tensor | None]:
    """Which of ``reqs`` (logits row ``rows[i]`` each) asked for log-probabilities, and theirs
    [len(scored), V]: a copy, taken now."""
    scored = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    return scored, log_probs(logits[[rows[i] for i in scored]]) if scored else None


def _step_inputs(slots: Slots, n: int) -> tuple[list[int], list[int]]:
    """Tokens and positions [n] that rows ``0..n-1`` are fed in a decode step."""
    tokens, positions = [0] * n, [0] * n
    for slot in range(n):
        occupant = slots[slot]
        if occupant is None:  # a free slot: write only entry C - 1, which no resident prefix
            positions[slot] = -1  # holds (and see no key, so the row's output is garbage)
            continue
        if occupant.decoding:
            tokens[slot] = occupant.output[-1]
            positions[slot] = len(occupant.prompt) + len(occupant.output) - 1
        else:  # half prefilled: scribble only where its next chunk will write
            positions[slot] = occupant.prefilled
    return tokens, positions
