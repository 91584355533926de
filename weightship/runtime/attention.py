"""Decode attention over the KV cache: one query position per row, ``G`` query heads per key head.

Three formulations of the same softmax attention, chosen by :data:`DECODE_KERNELS` (the model's
``decode_attention``; ``bench/runtime.py --cuda --paths`` measures them side by side):

- ``sdpa`` (the default): ``F.scaled_dot_product_attention``. At batch 1 a fused attention
  kernel runs one block per (row, key head): 8 blocks for Mistral 7B, on a GPU of 132 SMs.
- ``matmul``: scores by one batched matrix product, softmax in float32, a second product with
  the values. Each product spreads the cache's length over the whole GPU (cuBLAS splits the
  reduction over ``L`` for a product this skinny); the scores in between are only ``G * L``
  numbers per key head.
- ``split``: flash-decoding (Dao et al., 2023): the cache's ``L`` entries cut into ``parts``
  partitions, each partition's attention computed with its own running maximum and sum, and
  the partial results combined by their log-sum-exp: independent work per partition, which is
  what a decode step needs to fill a GPU. When ``L`` is not a multiple of ``parts`` (never with
  CUDA graphs, whose cache-length buckets are powers of two from 256) it computes ``matmul``.

All three take ``q`` [B, Hkv, G, D], ``k``/``v`` [B, Hkv, L, D] (views of the cache) and an
additive ``mask`` [B, 1, 1, L], and return [B, Hkv, G, D]; in float32 their greedy tokens are
the same (tests/runtime/test_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DECODE_KERNELS = ("sdpa", "matmul", "split")
SPLIT_PARTS = 8


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5 + mask  # [B, Hkv, G, L]
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [B, Hkv, G, D]


def split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
          parts: int = SPLIT_PARTS) -> torch.Tensor:
    B, H, _, D = q.shape  # [B, Hkv, G, D]
    L = k.shape[2]
    if L % parts:
        return matmul(q, k, v, mask)
    c = L // parts
    kp = k.view(B, H, parts, c, D)  # [B, Hkv, P, c, D]: a view, the cache's rows are not copied
    vp = v.view(B, H, parts, c, D)
    # scores of every partition at once: [B, Hkv, P, G, c]
    s = torch.matmul(q.unsqueeze(2), kp.transpose(-1, -2)).float() * D**-0.5 + mask.view(B, 1, parts, 1, c)
    m = s.amax(dim=-1, keepdim=True)  # [B, Hkv, P, G, 1]: each partition's maximum
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a partition wholly masked adds 0
    e = torch.exp(s - m)  # [B, Hkv, P, G, c]
    partial = torch.matmul(e.to(v.dtype), vp).float()  # [B, Hkv, P, G, D]: unnormalised
    total = m.amax(dim=2, keepdim=True)  # [B, Hkv, 1, G, 1]
    w = torch.exp(m - total)  # [B, Hkv, P, G, 1]: each partition's weight in the whole
    out = (partial * w).sum(dim=2) / (e.sum(dim=-1, keepdim=True) * w).sum(dim=2)  # [B, Hkv, G, D]
    return out.to(q.dtype)


def decode_attention(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query position per row by the formulation ``kind``."""
    if kind == "matmul":
        return matmul(q, k, v, mask)
    if kind == "split":
        return split(q, k, v, mask)
    return sdpa(q, k, v, mask)
