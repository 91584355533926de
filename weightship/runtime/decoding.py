"""Running the batched decode step: eagerly, or replayed from CUDA graphs.

A decode step at batch size 1 is hundreds of small kernels whose launch cost exceeds their run
time; a CUDA graph launches them all at once. Graphs need static shapes, so the batch is padded
up to a bucket (1, 2, 4, 8, … ``max_batch``) and the cache entries read per row to a length
bucket (256, 512, … ``cache_len``); one graph is captured per bucket pair, all of them by
:meth:`DecodeRunner.warm_up` before a server turns ready (else the first time one is needed).
Capture runs the step once for real first (the warm-up CUDA graphs require), which is
harmless: the step is deterministic, so the replay writes the same keys to the same entries.

With graphs the whole step is also compiled (``torch.compile``, as gpt-fast does) before it is
captured: a graph removes the launch cost of each kernel but not the kernel itself, and the
compiled step fuses the mask, rotary, cache writes, residual adds and norms of a layer into a
few kernels around its matrix products. It is compiled with dynamic shapes, so one compilation
serves every bucket (batch 1 gets its own, as torch specialises sizes of 1), and it falls back
to the eager step, for good, if compilation fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from weightship.runtime import compile_cache
from weightship.runtime.cache import KVCache
from weightship.runtime.model import Transformer

log = logging.getLogger(__name__)

_MIN_KV_BUCKET = 256

Step = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


class _Graph:
    """One captured decode step: static inputs in, static logits and greedy tokens out."""

    def __init__(self, step: Step, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
                 pool: Any) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(tokens, positions, kv_len)  # warm-up: compilation, allocator, cuBLAS handles
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits, self.greedy = step(tokens, positions, kv_len)  # [B, V], [B]

    def replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.graph.replay()
        return self.logits, self.greedy


class DecodeRunner:
    """Runs :meth:`Transformer.decode` for rows ``0..n-1``, with CUDA graphs where it can."""

    def __init__(self, model: Transformer, cache: KVCache, use_graphs: bool | None = None,
                 compile_step: bool | None = None) -> None:
        self.model, self.cache = model, cache
        self.device = model.device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.compile_step = self.use_graphs if compile_step is None else compile_step
        # This runner's compiled step (None: eager), kept here rather than rebinding a global.
        self._compiled: Step | None = self._compile() if self.compile_step else None
        max_batch = cache.args.max_batch
        self.batch_buckets = _buckets(max_batch, 1)
        self.kv_buckets = _buckets(cache.cache_len, min(_MIN_KV_BUCKET, cache.cache_len))
        # Static inputs shared by every graph: graph b reads the first b entries of each row
        # (tokens, positions), filled by one host-to-device copy per step.
        self.inputs = torch.zeros(2, max_batch, dtype=torch.long, device=self.device)
        self._fed: list[int] = []  # the positions of the step launched last
        # Where launch_next() copies a step's greedy tokens to, without waiting for the GPU.
        self._host = torch.zeros(max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _compile(self) -> Step:
        return torch.compile(self._step, fullgraph=True, dynamic=True)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor,
              kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step itself: logits [B, V] (float32) and their argmax [B] (greedy tokens)."""
        logits = self.model.decode(tokens, positions, self.cache, kv_len)  # [B, V]
        return logits, logits.argmax(-1)  # [B, V], [B]

    def _run_step(self, tokens: torch.Tensor, positions: torch.Tensor,
                  kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_step`, compiled where it can be."""
        if self._compiled is not None:
            try:
                return self._compiled(tokens, positions, kv_len)
            except Exception as e:  # compilation problems surface at the first call of a shape
                if compile_cache.recover_from(e):  # a cache left by an earlier start: emptied
                    self._compiled = self._compile()
                    return self._run_step(tokens, positions, kv_len)
                log.warning("torch.compile of the decode step failed, running it eagerly: %s",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                self._compiled = None
        return self._step(tokens, positions, kv_len)

    def kv_needed(self, positions: list[int]) -> int:
        """Cache entries a step must read: all of them once any row's buffer has wrapped."""
        return min(max(positions) + 1, self.cache.cache_len)

    def __call__(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [n, V] and greedy tokens [n] of rows ``0..n-1`` fed ``tokens`` at ``positions``.

        ``n`` must be :meth:`padded_batch` of the rows wanted: the caller chooses what idle rows
        are fed, because only it knows which slots are free and which are half prefilled.
        """
        self._fed = list(positions)
        if not self.use_graphs:
            t = torch.tensor(tokens, dtype=torch.long, device=self.device)
            p = torch.tensor(positions, dtype=torch.long, device=self.device)
            return self._run_step(t, p, self.kv_needed(positions))
        self.inputs[:, : len(tokens)].copy_(torch.tensor([tokens, positions], dtype=torch.long))  # [2, n]
        return self._replay(len(tokens))

    def _replay(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay (capturing it first if new) the graph of rows ``0..n-1`` fed ``self.inputs``."""
        assert n in self.batch_buckets, (n, self.batch_buckets)
        kv_len = self.kv_needed(self._fed)
        kv = next(x for x in self.kv_buckets if x >= kv_len)
        graph = self._graphs.get((n, kv))
        if graph is None:
            log.info("capturing a CUDA graph for decode at batch %d, %d cache entries%s", n, kv,
                     " (compiled step)" if self._compiled is not None else "")
            graph = _Graph(self._run_step, self.inputs[0, :n], self.inputs[1, :n], kv, self._pool)
            self._graphs[(n, kv)] = graph
        return graph.replay()

    def launch_next(self, greedy: torch.Tensor) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor]]:
        """Launch the next step of the same rows before the host has the last step's tokens.

        ``greedy`` [n] are the greedy tokens of the step launched last; the next step feeds them
        back one position further on, on the device. Returns them on the host, read after the
        next step is queued, so the GPU never idles while the host does its bookkeeping, and
        the next step's outputs (logits [n, V], greedy tokens [n]).
        """
        n = greedy.shape[0]
        host = self._host[:n]
        host.copy_(greedy, non_blocking=True)
        copied = torch.cuda.Event() if self.device.type == "cuda" else None
        if copied is not None:
            copied.record()
        self._fed = [p + 1 for p in self._fed]
        if self.use_graphs:
            self.inputs[0, :n].copy_(greedy)
            self.inputs[1, :n] += 1
            out = self._replay(n)
        else:
            positions = torch.tensor(self._fed, dtype=torch.long, device=self.device)
            out = self._run_step(greedy.clone(), positions, self.kv_needed(self._fed))
        if copied is not None:
            copied.synchronize()
        return host.tolist(), out

    def warm_up(self) -> None:
        """Compile and capture every decode shape now, so that no request waits for it later.

        With graphs, one step per batch bucket and cache-length bucket; compiled without graphs,
        where shapes are dynamic, batch 1 and 2 (torch specialises sizes of 1; 2 stands for every
        larger batch). The steps write garbage to the cache: call it before any sequence is
        admitted (it resets them all).
        """
        if self.use_graphs:
            shapes = [(n, kv) for n in self.batch_buckets for kv in self.kv_buckets]
        elif self._compiled is not None:
            shapes = [(n, self.kv_buckets[0]) for n in sorted({1, min(2, self.batch_buckets[-1])})]
        else:
            return
        for n, kv in shapes:
            self([0] * n, [kv - 1] * n)  # position kv - 1: a step reading kv entries
        self.cache.pos.fill_(-1)

    def padded_batch(self, n: int) -> int:
        """Rows a step over ``n`` rows really computes (its bucket with graphs)."""
        return next(x for x in self.batch_buckets if x >= n) if self.use_graphs else n
