"""How much GPU memory, host memory and disk a model needs: the sizing behind the chart values.

GPU memory = weights (parameters x bytes per parameter of the serving dtype)
           + KV cache (2 tensors x layers x KV heads x head_dim x bytes, per token, for
             max_batch sequences of max_model_len tokens)
           + overhead (10 % of the weights for activations and allocator slack, plus 1 GiB of
             CUDA context).
Disk = the model's file bytes x 1.25 (partial downloads live beside finished files until they
are promoted) + 1 GiB.

For Mistral 7B v0.1 in bf16 with 8 sequences of 8,192 tokens: 13.5 GiB of weights + 8 GiB of
KV cache + 2.3 GiB ≈ 24 GiB of GPU memory, 18 GiB of disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from weightship.catalog.architecture import Architecture
from weightship.errors import UsageError

GIB = 1 << 30
MIB = 1 << 20
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4}
DISK_HEADROOM = 1.25
OVERHEAD_FRACTION = 0.10
CUDA_CONTEXT_BYTES = 1 * GIB


@dataclass(frozen=True)
class Sizing:
    """What one serving pod needs for a model at a dtype and batch shape."""

    file_bytes: int  # the model directory's published files
    weights_bytes: int  # parameters at the serving dtype
    kv_cache_bytes: int
    gpu_memory_bytes: int  # weights + KV cache + overhead
    disk_bytes: int  # volume size with headroom
    max_batch: int
    max_model_len: int
    dtype: str

    @property
    def gpu_memory_mib(self) -> int:
        return math.ceil(self.gpu_memory_bytes / MIB)

    def storage_quantity(self) -> str:
        """The volume size as a Kubernetes quantity in whole GiB."""
        return f"{math.ceil(self.disk_bytes / GIB)}Gi"

    def host_memory(self, gpu: bool) -> dict[str, str]:
        """Memory requests/limits of the serving container: with a GPU the weights pass
        through host memory once (mmap'd safetensors); on CPU they and the cache stay there."""
        resident = self.weights_bytes + (0 if gpu else self.kv_cache_bytes)
        request = math.ceil(resident / GIB) + 4
        return {"requests": f"{request}Gi", "limits": f"{request + 8}Gi"}

    def summary(self) -> dict[str, Any]:
        return {"file_bytes": self.file_bytes, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "gpu_memory_mib": self.gpu_memory_mib,
                "storage": self.storage_quantity(), "dtype": self.dtype,
                "max_batch": self.max_batch, "max_model_len": self.max_model_len}


def size_model(arch: Architecture, *, file_bytes: int, dtype: str, max_batch: int,
               max_model_len: int) -> Sizing:
    """The :class:`Sizing` of ``arch`` served at ``dtype`` with the given batch shape."""
    if dtype not in BYTES_PER_PARAM:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use one of: " + ", ".join(BYTES_PER_PARAM))
    if max_batch < 1 or max_model_len < 1:
        raise UsageError(f"max batch and max model length must be positive "
                         f"(got {max_batch}, {max_model_len})")
    width = BYTES_PER_PARAM[dtype]
    tokens = max_batch * min(max_model_len, arch.max_seq_len)
    kv_per_token = 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * width
    weights = arch.n_params * width
    kv = tokens * kv_per_token
    gpu = weights + kv + math.ceil(weights * OVERHEAD_FRACTION) + CUDA_CONTEXT_BYTES
    disk = math.ceil(file_bytes * DISK_HEADROOM) + GIB
    return Sizing(file_bytes=file_bytes, weights_bytes=weights, kv_cache_bytes=kv,
                  gpu_memory_bytes=gpu, disk_bytes=disk, max_batch=max_batch,
                  max_model_len=min(max_model_len, arch.max_seq_len), dtype=dtype)
