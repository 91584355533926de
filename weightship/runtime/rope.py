"""Rotary position embeddings (Su et al., 2021, "RoFormer"), in the original Mistral convention.

The original layout rotates the pairs of dimensions (2i, 2i+1) of each head; the HF layout has
the rows of ``wq``/``wk`` permuted so that it can rotate (i, i + head_dim/2) instead. The loader
undoes that permutation, so one convention serves both layouts.
"""

from __future__ import annotations

import torch


def rotary_table(head_dim: int, max_len: int, theta: float,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles: two float32 tensors of shape [max_len, head_dim/2].

    The frequencies and angles are computed as transformers does (``1 / theta**(2i/d)`` and
    ``position * frequency`` in float32), so float32 logits agree with it to rounding. Their
    cosines and sines are taken in float64 and rounded once, so the table is the same on every
    machine, whatever accuracy its float32 ``cos``/``sin`` kernels have.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device)
                                .float() / head_dim))
    pos = torch.arange(max_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq).double()  # [max_len, head_dim/2], float32 values
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., T, H, D] by the angles ``cos``/``sin`` [..., T, D/2] of its positions."""
    xf = x.float().unflatten(-1, (-1, 2))  # [..., T, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]  # [..., T, H, D/2] each
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, D/2]: broadcast over heads
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # [..., T, H, D/2, 2]
    return out.flatten(-2).type_as(x)  # [..., T, H, D]
