"""The memory roofline of a decode step: how fast it could run if it did nothing but read.

A decode step reads every weight once, whatever the batch, and each stream's keys and values
for the positions it attends to; at the batch sizes served (up to a few hundred streams) it is
bound by memory bandwidth, not arithmetic. So the least time a step of ``n`` streams at context
``c`` can take is ``(weight bytes + n * kv_bytes(c)) / bandwidth``, and ``n`` tokens per step is
the most it can deliver. ``bench/runtime.py`` prints measured step times against it.

The arithmetic per step (sliding window ``w``: a stream reads at most ``w`` positions)::

    weight bytes     = parameters * dtype size (the embedding table counted whole, as the
                       data-sheet bound of DESIGN.md does; a step reads only its rows of it)
    kv bytes/stream  = 2 (K and V) * layers * kv heads * head dim * min(c, w) * dtype size
    step time        = (weight bytes + streams * kv bytes/stream) / bandwidth
    tokens/s         = streams / step time
"""

from __future__ import annotations

from dataclasses import dataclass

from weightship.catalog.architecture import Architecture


@dataclass(frozen=True)
class Roofline:
    """The memory roofline of decoding ``arch`` with ``dtype_bytes``-byte weights and cache."""

    arch: Architecture
    dtype_bytes: int
    bandwidth: float  # bytes/s the device's memory delivers

    @property
    def weight_bytes(self) -> int:
        return self.arch.n_params * self.dtype_bytes

    def kv_bytes(self, context: int) -> int:
        """Bytes of one stream's keys and values a step reads at ``context`` positions."""
        a = self.arch
        positions = min(context, a.sliding_window) if a.sliding_window else context
        return 2 * a.n_layers * a.n_kv_heads * a.head_dim * positions * self.dtype_bytes

    def step_bytes(self, streams: int, context: int) -> int:
        return self.weight_bytes + streams * self.kv_bytes(context)

    def step_seconds(self, streams: int, context: int) -> float:
        """The least time a step of ``streams`` streams at ``context`` positions takes."""
        return self.step_bytes(streams, context) / self.bandwidth

    def tokens_per_second(self, streams: int, context: int) -> float:
        return streams / self.step_seconds(streams, context)
