"""The layers of a Mistral transformer block: RMSNorm, attention with a KV cache, SwiGLU.

Module and parameter names follow the original layout (``attention.wq``, ``feed_forward.w1``,
``attention_norm``), so an original-layout state dict loads with ``strict=True`` as it is.
References: mistral-inference ``transformer_layers.py``; gpt-fast ``model.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from weightship.runtime.args import ModelArgs
from weightship.runtime.attention import decode_attention
from weightship.runtime.pointwise import Pointwise


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Which keys each query may attend to: causal, within ``window`` and not empty.

    ``q_pos`` [..., T] and ``k_pos`` [..., K] are absolute positions (-1 = empty entry); the
    result is a bool tensor [..., T, K]. A key at ``kp`` is visible from ``qp`` iff
    ``qp - window < kp <= qp``: the query and the ``window - 1`` positions before it, exactly
    transformers' ``sliding_window_overlay`` (``kv_idx > q_idx - sliding_window``).

    An idle decode row (query position -1) sees every entry instead. Its output is garbage either
    way, but a row that sees nothing is NaN in some attention kernels, and the NaN keys it wrote
    would poison every row that reads that entry later, masked or not.
    """
    q = q_pos.unsqueeze(-1)  # [..., T, 1]
    k = k_pos.unsqueeze(-2)  # [..., 1, K]
    return ((k >= 0) & (k <= q) & (k > q - window)) | (q < 0)


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a bool mask (0 or -inf), made once per step rather than per layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def adjacent_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The matrix whose rows are ``parts`` one after another, as a view, if they already lie
    that way in one storage (the loader allocates them so); else None."""
    first = parts[0]
    offset = first.storage_offset()
    for p in parts:
        if (p.dim() != 2 or not p.is_contiguous() or p.shape[1] != first.shape[1]
                or p.dtype != first.dtype or p.device != first.device
                or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or p.storage_offset() != offset):
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())


def fuse_rows(*linears: nn.Linear) -> torch.Tensor:
    """One matrix holding the weights of ``linears`` one after another, their parameters views
    of it (the state dict keeps its names, the memory is not doubled). Free when the weights
    already lie that way; else one copy."""
    parts = [lin.weight for lin in linears]
    fused = adjacent_rows(parts)
    if fused is None:
        fused = torch.cat(parts)
        for lin, part in zip(linears, fused.split([p.shape[0] for p in parts]), strict=True):
            lin.weight = nn.Parameter(part, requires_grad=False)
    return fused


@dataclass
class WholeInputs:
    """Whole sequences scored with no cache (:meth:`Transformer.forward`)."""

    cos: torch.Tensor  # [B, T, D/2]
    sin: torch.Tensor  # [B, T, D/2]
    mask: torch.Tensor  # additive (0 / -inf) [B, 1, T, T]


@dataclass
class DecodeInputs:
    """A batched decode step: one token per row ``0..B-1`` (slot = row), its key written to
    entry ``write_idx`` of its slot, attending to the first ``kv_len`` entries of the cache."""

    cos: torch.Tensor  # [B, 1, D/2]
    sin: torch.Tensor  # [B, 1, D/2]
    mask: torch.Tensor  # additive [B, 1, 1, kv_len]
    write_idx: torch.Tensor  # [B]
    rows: torch.Tensor  # arange(B)
    kv_len: int


@dataclass
class PrefillInputs:
    """A prefill of one row of T tokens: a chunk of the sequence in ``slot``, over that slot's
    cache and then its own keys, or (``slot`` None) several whole prompts packed together, each
    seeing only its own keys. Token ``src[i]``'s key goes to entry ``write_idx[i]`` of slot
    ``rows[i]``."""

    cos: torch.Tensor  # [1, T, D/2]
    sin: torch.Tensor  # [1, T, D/2]
    mask: torch.Tensor  # additive [1, 1, T, K]: K = C + 1 + T with a slot, else T
    write_idx: torch.Tensor  # [n]
    rows: torch.Tensor  # [n]
    src: torch.Tensor  # [n]
    slot: int | None = None  # the slot whose cache earlier chunks are in


# What every attention layer of one forward pass shares: positions, mask, cache writes.
AttentionInputs = WholeInputs | DecodeInputs | PrefillInputs


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, dim: int, eps: float, pw: Pointwise) -> None:
        super().__init__()
        self.eps = eps
        self.pw = pw
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions, reading and writing the KV cache."""

    def __init__(self, args: ModelArgs, pw: Pointwise) -> None:
        super().__init__()
        a = args.arch
        self.pw = pw
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.wq = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        self.wqkv: torch.Tensor | None = None  # set by fuse_projections()
        self.decode_kernel = "sdpa"  # see attention.py; Transformer.set_decode_attention()

    def fuse_projections(self) -> None:
        """Keep wq, wk, wv in one tensor: one matrix product instead of three.

        The three parameters become views of the fused tensor, so the state dict keeps its
        names and the memory is not doubled.
        """
        self.wqkv = fuse_rows(self.wq, self.wk, self.wv)  # [(H + 2 Hkv) D, dim]

    def forward(self, x: torch.Tensor, inp: AttentionInputs,
                k_cache: torch.Tensor | None, v_cache: torch.Tensor | None) -> torch.Tensor:
        """``x`` [B, T, dim] → [B, T, dim]; ``k_cache``/``v_cache`` are this layer's [S, Hkv, C + 1, D]."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        assert self.wqkv is not None, "fuse() was not called after loading"
        qkv = F.linear(x, self.wqkv)  # [B, T, (H + 2 Hkv) D]
        # q and k side by side: one rotary kernel for both
        qk = qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D)
        q, k = self.pw.rotary(qk, inp.cos, inp.sin).split([H, Hkv], dim=2)  # [B, T, H|Hkv, D]
        v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D)  # [B, T, Hkv, D]
        if isinstance(inp, WholeInputs):
            out = F.scaled_dot_product_attention(  # [B, H, T, D]
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=inp.mask, enable_gqa=True)
            return self.wo(out.transpose(1, 2).reshape(B, T, H * D))
        assert k_cache is not None and v_cache is not None
        if isinstance(inp, DecodeInputs):
            return self.wo(self._decode(q, k, v, inp, k_cache, v_cache))
        return self.wo(self._prefill(q, k, v, inp, k_cache, v_cache))

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: DecodeInputs,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        B, H, Hkv, D = q.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        assert q.shape[1] == 1, q.shape
        # Rows and entries are advanced indices split by a slice: the written value is [B, Hkv, D].
        k_cache[inp.rows, :, inp.write_idx] = k[:, 0]
        v_cache[inp.rows, :, inp.write_idx] = v[:, 0]
        # The G = H/Hkv query heads sharing a key/value head are G queries of that head with
        # the same mask: attention over the cache with no repeated (copied) keys.
        qg = q.view(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]
        keys = k_cache[:B, :, : inp.kv_len]  # [B, Hkv, L, D], a view
        values = v_cache[:B, :, : inp.kv_len]  # [B, Hkv, L, D]
        out = decode_attention(self.decode_kernel, qg, keys, values, inp.mask)  # [B, Hkv, G, D]
        return out.reshape(B, 1, H * D)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: PrefillInputs,
                 k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        T, H, D = q.shape[1], self.n_heads, self.head_dim
        assert q.shape[0] == 1, q.shape
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [1, Hkv, T, D]
        if inp.slot is not None:  # earlier chunks: the slot's entries, then this chunk's own keys
            keys = torch.cat((k_cache[inp.slot : inp.slot + 1], kt), dim=2)  # [1, Hkv, C + 1 + T, D]
            values = torch.cat((v_cache[inp.slot : inp.slot + 1], vt), dim=2)
        else:
            keys, values = kt, vt
        out = F.scaled_dot_product_attention(  # [1, H, T, D]
            q.transpose(1, 2), keys, values, attn_mask=inp.mask, enable_gqa=True)
        k_cache[inp.rows, :, inp.write_idx] = k[0, inp.src]  # [n, Hkv, D]
        v_cache[inp.rows, :, inp.write_idx] = v[0, inp.src]
        return out.transpose(1, 2).reshape(1, T, H * D)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, args: ModelArgs, pw: Pointwise) -> None:
        super().__init__()
        a = args.arch
        self.pw = pw
        self.w1 = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.w2 = nn.Linear(a.hidden_dim, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.w13: torch.Tensor | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Keep w1 and w3 in one tensor (as :meth:`Attention.fuse_projections`)."""
        self.w13 = fuse_rows(self.w1, self.w3)  # [2 hidden, dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.w13 is not None, "fuse() was not called after loading"
        gate, up = F.linear(x, self.w13).chunk(2, dim=-1)  # [B, T, hidden] each
        return self.w2(self.pw.swiglu_gate(gate, up))


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward, each with a residual connection."""

    def __init__(self, args: ModelArgs, pw: Pointwise) -> None:
        super().__init__()
        self.pw = pw
        self.attention = Attention(args, pw)
        self.feed_forward = FeedForward(args, pw)
        self.attention_norm = RMSNorm(args.arch.dim, args.arch.norm_eps, pw)
        self.ffn_norm = RMSNorm(args.arch.dim, args.arch.norm_eps, pw)

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None, inp: AttentionInputs,
                k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the residual stream: ``h`` [B, T, dim] plus the previous block's ``delta``.

        Returns the new ``(h, delta)``. Each residual sum is left to the norm that follows it,
        which computes both in one kernel (the last one is added by the model's final norm).
        """
        eps = self.attention_norm.eps
        if delta is None:
            x = self.attention_norm(h)
        else:
            h, x = self.pw.add_rms_norm(h, delta, self.attention_norm.weight, eps)
        h, x = self.pw.add_rms_norm(h, self.attention(x, inp, k_cache, v_cache),
                                    self.ffn_norm.weight, eps)
        return h, self.feed_forward(x)
