"""Running the batched decode step: eagerly, or replayed from CUDA graphs.

A decode step at batch size 1 is hundreds of small kernels whose launch cost exceeds their run
time; a CUDA graph launches them all at once. Graphs need static shapes, so the batch is padded
up to a bucket (1, 2, 4, 8, … ``max_batch``) and the cache entries read per row to a length
bucket (256, 512, … ``cache_len``); one graph is captured per bucket pair the first time it is
needed. Capture runs the step once for real first (the warm-up CUDA graphs require), which is
harmless: the step is deterministic, so the replay writes the same keys to the same entries.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from weightship.runtime.cache import KVCache
from weightship.runtime.model import Transformer

log = logging.getLogger(__name__)

_MIN_KV_BUCKET = 256


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


class _Graph:
    """One captured decode step: static inputs in, static logits out."""

    def __init__(self, model: Transformer, cache: KVCache, tokens: torch.Tensor,
                 positions: torch.Tensor, kv_len: int, pool: Any) -> None:
        self.tokens, self.positions = tokens, positions
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model.decode(tokens, positions, cache, kv_len)  # warm-up: allocator, cuBLAS handles
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model.decode(tokens, positions, cache, kv_len)  # [B, V]

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class DecodeRunner:
    """Runs :meth:`Transformer.decode` for rows ``0..n-1``, with CUDA graphs where it can."""

    def __init__(self, model: Transformer, cache: KVCache, use_graphs: bool | None = None) -> None:
        self.model, self.cache = model, cache
        self.device = model.device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        max_batch = cache.args.max_batch
        self.batch_buckets = _buckets(max_batch, 1)
        self.kv_buckets = _buckets(cache.cache_len, min(_MIN_KV_BUCKET, cache.cache_len))
        # Static inputs shared by every graph: graph b reads the first b entries of each row
        # (tokens, positions), filled by one host-to-device copy per step.
        self.inputs = torch.zeros(2, max_batch, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def kv_needed(self, positions: list[int]) -> int:
        """Cache entries a step must read: all of them once any row's buffer has wrapped."""
        return min(max(positions) + 1, self.cache.cache_len)

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [n, V] of rows ``0..n-1`` fed ``tokens`` at ``positions``.

        ``n`` must be :meth:`padded_batch` of the rows wanted: the caller chooses what idle rows
        are fed, because only it knows which slots are free and which are half prefilled.
        """
        n = len(tokens)
        kv_len = self.kv_needed(positions)
        if not self.use_graphs:
            t = torch.tensor(tokens, dtype=torch.long, device=self.device)
            p = torch.tensor(positions, dtype=torch.long, device=self.device)
            return self.model.decode(t, p, self.cache, kv_len)
        assert n in self.batch_buckets, (n, self.batch_buckets)
        kv = next(x for x in self.kv_buckets if x >= kv_len)
        self.inputs[:, :n].copy_(torch.tensor([tokens, positions], dtype=torch.long))  # [2, n]
        graph = self._graphs.get((n, kv))
        if graph is None:
            log.info("capturing a CUDA graph for decode at batch %d, %d cache entries", n, kv)
            graph = _Graph(self.model, self.cache, self.inputs[0, :n], self.inputs[1, :n], kv,
                           self._pool)
            self._graphs[(n, kv)] = graph
        return graph.replay()

    def padded_batch(self, n: int) -> int:
        """Rows a step over ``n`` rows really computes (its bucket with graphs)."""
        return next(x for x in self.batch_buckets if x >= n) if self.use_graphs else n
