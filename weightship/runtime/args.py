"""The model's hyper-parameters as the runtime uses them.

:class:`ModelArgs` wraps the catalog's :class:`~weightship.catalog.architecture.Architecture`
(the published facts of a model) with what a running server chooses: how many sequences share
the KV cache and how long each may grow. Reference: mistral-inference ``args.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from weightship.catalog.architecture import Architecture
from weightship.errors import UsageError


@dataclass(frozen=True)
class ModelArgs:
    """An architecture plus the serving limits that size the KV cache."""

    arch: Architecture
    # KV-cache slots: the most sequences decoded in one batch. Memory grows linearly with it;
    # decode throughput grows almost linearly too until the GPU turns compute-bound.
    max_batch: int = 8
    # Longest prompt + completion. Bounds the rotary table; with no sliding window it is also
    # the per-slot cache length.
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_model_len < 2:
            raise UsageError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @property
    def cache_len(self) -> int:
        """Entries per slot: a rolling buffer of the window is all sliding attention reads."""
        window = self.arch.sliding_window
        return self.max_model_len if window is None else min(window, self.max_model_len)

    @property
    def window(self) -> int:
        """Keys a query may attend to, itself included (HF: ``kv > q - window``)."""
        return self.arch.sliding_window or self.max_model_len
