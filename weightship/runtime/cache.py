"""The preallocated KV cache: one rolling buffer per sequence slot.

Sliding-window attention only ever reads the last ``window`` keys, so each slot holds
``cache_len = min(window, max_model_len)`` entries and position ``p`` lives at entry
``p % cache_len`` (mistral-inference's rolling buffer). Beside the keys and values the cache
keeps, per slot, the absolute position stored in each entry (-1 = empty); attention masks are
computed from those positions, so the same code serves full, partial and wrapped buffers.

Slots are indexed by batch row: decode runs rows ``0..B-1`` over slots ``0..B-1``, which lets
it read ``k[layer, :B]`` as a view instead of gathering a copy of every active sequence's cache.

Each slot has one spare entry past the ``cache_len`` used, never written (position -1): a step
that reads all ``cache_len`` entries then still reads a strict prefix. torch.compile treats a
slice spanning a whole dimension (contiguous) as a different graph, and would compile the
decode step twice as often.
"""

from __future__ import annotations

import torch

from weightship.runtime.args import ModelArgs


class KVCache:
    """Keys, values and stored positions for ``max_batch`` sequences."""

    def __init__(self, args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> None:
        a = args.arch
        self.args = args
        self.cache_len = args.cache_len
        shape = (args.max_batch, a.n_kv_heads, self.cache_len + 1, a.head_dim)  # + the spare entry
        # k[layer], v[layer]: [S, Hkv, C + 1, D] — per slot a contiguous block, so a
        # prefix of the C entries of rows 0..B-1 is a strided view that SDPA reads without a copy.
        # One tensor per layer rather than one [L, S, Hkv, C, D] tensor: a compiled decode step
        # (torch.compile) then writes each layer's cache in place, where a write through a view
        # of one big input would make it copy the whole layer's cache every step.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(a.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(a.n_layers)]
        # pos: [S, C + 1] — the absolute position held by each entry, -1 where empty.
        self.pos = torch.full((args.max_batch, self.cache_len + 1), -1, device=device, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def reset_slot(self, slot: int) -> None:
        """Forget a slot's sequence (its stale keys stay, masked out by position -1)."""
        self.pos[slot].fill_(-1)

    def write_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Entries that absolute ``positions`` occupy in the rolling buffer."""
        return positions % self.cache_len
