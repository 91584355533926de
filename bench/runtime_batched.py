"""Batched decode against its roofline, for bench/runtime.py.

For each stream count the decode step of that many streams, all at one context length, is timed
on its own (no scheduling, no sampling: the runner's step, replayed from its CUDA graph on a
GPU), and set beside the memory roofline (weightship/runtime/roofline.py): the weights read
once plus each stream's keys and values at the mean context of the measured steps, over the
device's bandwidth. Per stream, a step is also its time per token: the last two columns say how
much longer each stream waits per token than it would alone, measured and by the roofline.

The cache is filled by writing positions, not by prefilling prompts: a step reads the same
entries whatever they hold, and 128 prompts of 1024 tokens would take longer to prefill than
every step measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from weightship.runtime.engine import Engine
from weightship.runtime.roofline import Roofline


@dataclass(frozen=True)
class StepRate:
    streams: int
    step_s: float  # median time of one decode step
    context: float  # mean context (positions attended) over the measured steps


def step_rate(engine: Engine, streams: int, context: int, steps: int, runs: int,
              sync: Callable[[], None]) -> StepRate:
    """Time ``steps`` decode steps of rows ``0..streams-1`` from position ``context`` on."""
    runner, cache = engine.runner, engine.cache
    n = runner.padded_batch(streams)
    assert n == streams, f"{streams} streams is no batch bucket ({runner.batch_buckets})"
    cache.pos[:streams].fill_(-1)
    # the positions a stream at ``context`` holds: the last cache_len of them, in the rolling buffer
    held = torch.arange(max(0, context - cache.cache_len), context, device=cache.pos.device)
    cache.pos[:streams, cache.write_index(held)] = held
    runner([1] * n, [context] * n)  # compiles or captures this shape if it is new
    times = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        for i in range(steps):
            runner([1] * n, [context + 1 + i] * n)
        sync()
        times.append((time.perf_counter() - t) / steps)
    cache.pos.fill_(-1)
    times.sort()
    return StepRate(streams, times[len(times) // 2], context + 1 + (steps - 1) / 2)


def batched_table(engine: Engine, roofline: Roofline, streams: list[int], context: int, steps: int,
                  runs: int, sync: Callable[[], None], where: str) -> list[StepRate]:
    """Print measured steps against the roofline for each stream count; return them."""
    a = roofline.arch
    print(f"\nBatched decode, {where}: {context} positions per stream, {steps} steps, median of {runs}")
    print(f"roofline = (weights {roofline.weight_bytes / 1e9:.3f} GB + streams x KV "
          f"{roofline.kv_bytes(context) / 1e6:.2f} MB [2 x {a.n_layers} layers x {a.n_kv_heads} heads x "
          f"{a.head_dim} x {min(context, a.sliding_window or context)} positions x {roofline.dtype_bytes} B]) "
          f"/ {roofline.bandwidth / 1e9:.1f} GB/s",
          flush=True)
    print(f"{'streams':>7} {'step ms':>9} {'tokens/s':>10} {'roofline ms':>12} {'roofline tok/s':>15} "
          f"{'% of roofline':>14} {'step vs 1 stream':>17} {'(roofline)':>11}")
    rates = []
    for n in streams:
        try:
            r = step_rate(engine, n, context, steps, runs, sync)
        except Exception as e:  # one stream count failing (memory) must not cost the others
            print(f"{n:>7} failed: {e!r}", flush=True)
            continue
        rates.append(r)
        ctx = round(r.context)
        bound = roofline.step_seconds(n, ctx)
        base = rates[0]
        growth = r.step_s / base.step_s
        bound_growth = bound / roofline.step_seconds(base.streams, round(base.context))
        print(f"{n:>7} {r.step_s * 1e3:>9.2f} {n / r.step_s:>10.1f} {bound * 1e3:>12.2f} "
              f"{n / bound:>15.1f} {100 * bound / r.step_s:>13.1f}% {growth:>16.2f}x {bound_growth:>10.2f}x",
              flush=True)
    return rates


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s a device copy moves (read + write counted), median of 10."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    times = []
    for _ in range(10):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]
