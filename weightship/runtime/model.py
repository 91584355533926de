"""The Mistral transformer (Jiang et al., 2023, "Mistral 7B"), in plain PyTorch.

Three entry points share the layers:
- :meth:`Transformer.forward` scores whole sequences without a cache (the reference path);
- :meth:`Transformer.prefill` runs a chunk of one sequence's prompt into its cache slot;
- :meth:`Transformer.decode` advances rows ``0..B-1`` by one token each. It does no host
  synchronisation and takes only static shapes, so a CUDA graph can capture it
  (:mod:`weightship.runtime.decoding`).

References: mistral-inference ``transformer.py``; gpt-fast ``model.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from weightship.runtime.args import ModelArgs
from weightship.runtime.cache import KVCache
from weightship.runtime.layers import (
    AttentionInputs,
    RMSNorm,
    TransformerBlock,
    mask_bias,
    window_mask,
)
from weightship.runtime.pointwise import Pointwise
from weightship.runtime.rope import rotary_table


class Transformer(nn.Module):
    """Embedding, ``n_layers`` blocks, final norm and output projection."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        a = args.arch
        self.args = args
        self.pointwise = Pointwise()  # shared by every layer; see fuse()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, self.pointwise) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps, self.pointwise)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        # Not part of the state dict: recomputed on the weights' device by init_rotary().
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def init_rotary(self) -> None:
        """Compute the rotary table on the device the weights were loaded to."""
        a = self.args.arch
        device = self.tok_embeddings.weight.device
        cos, sin = rotary_table(a.head_dim, self.args.max_model_len, a.rope_theta, device)
        self.rope_cos, self.rope_sin = cos, sin

    def fuse(self, compile_pointwise: bool | None = None) -> None:
        """Fuse projections (always) and elementwise ops (torch.compile; default: on CUDA)."""
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)
            layer.attention.fuse_projections()
            layer.feed_forward.fuse_projections()
        if compile_pointwise if compile_pointwise is not None else self.device.type == "cuda":
            self.pointwise.compile()

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def _run(self, tokens: torch.Tensor, inp: AttentionInputs, cache: KVCache | None) -> torch.Tensor:
        """Blocks over the embedded ``tokens`` [B, T] → final hidden states [B, T, dim]."""
        assert self.rope_cos.numel() > 0, "init_rotary() was not called after loading"
        h = self.tok_embeddings(tokens)  # [B, T, dim]
        delta: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            k_cache = cache.k[i] if cache is not None else None
            v_cache = cache.v[i] if cache is not None else None
            h, delta = layer(h, delta, inp, k_cache, v_cache)
        assert delta is not None
        return self.pointwise.add_rms_norm(h, delta, self.norm.weight, self.norm.eps)[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of whole sequences ``tokens`` [B, T], no cache."""
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)
        mask = window_mask(pos, pos, self.args.window)  # [T, T]
        inp = AttentionInputs(cos=self.rope_cos[pos].expand(B, T, -1),
                              sin=self.rope_sin[pos].expand(B, T, -1),
                              mask=mask_bias(mask, self.dtype).expand(B, 1, T, T))
        return self.output(self._run(tokens, inp, None)).float()

    def prefill(self, tokens: torch.Tensor, start: int, slot: int, cache: KVCache,
                all_logits: bool = False) -> torch.Tensor:
        """Run positions ``start .. start+T-1`` of the sequence in ``slot`` into the cache.

        ``tokens`` is [T]. Returns the float32 logits of the last position [vocab], or of every
        position [T, vocab] with ``all_logits``. Chunks must come in order; ``start == 0``
        resets the slot.
        """
        (T,) = tokens.shape
        assert start + T <= self.args.max_model_len, (start, T, self.args.max_model_len)
        if start == 0:
            cache.reset_slot(slot)
        pos = torch.arange(start, start + T, device=tokens.device)  # [T]
        if start > 0:
            # Entries at >= start are stale: an idle decode row may have scribbled on one.
            cached = cache.pos[slot].masked_fill(cache.pos[slot] >= start, -1)  # [C]
            k_pos = torch.cat((cached, pos))  # [C + T]
        else:
            k_pos = pos
        mask = window_mask(pos, k_pos, self.args.window)  # [T, K]
        kept = pos[-cache.cache_len :]  # the positions that stay in the rolling buffer
        write_idx = cache.write_index(kept)
        inp = AttentionInputs(cos=self.rope_cos[pos].unsqueeze(0), sin=self.rope_sin[pos].unsqueeze(0),
                              mask=mask_bias(mask, self.dtype)[None, None], write_idx=write_idx, slot=slot,
                              with_cache=start > 0)
        h = self._run(tokens.unsqueeze(0), inp, cache)[0]  # [T, dim]
        cache.pos[slot, write_idx] = kept
        if not all_logits:
            h = h[-1]
        return self.output(h).float()

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               kv_len: int, flex: bool = False) -> torch.Tensor:
        """One token for each of rows ``0..B-1`` (slot = row): float32 logits [B, vocab].

        ``tokens`` and ``positions`` are [B]; ``kv_len`` cache entries are read per row, which
        must cover every filled entry of those slots (``cache_len`` once any has wrapped).
        Rows whose slot is idle compute garbage that touches only their own slot. ``flex``:
        attention by flex_attention, for a compiled step (see :class:`AttentionInputs`).
        """
        (B,) = tokens.shape
        rows = torch.arange(B, device=tokens.device)
        write_idx = cache.write_index(positions)
        cache.pos[rows, write_idx] = positions  # before the layers: the mask includes the new key
        k_pos = cache.pos[:B, :kv_len]  # [B, L]
        mask = window_mask(positions.unsqueeze(-1), k_pos, self.args.window)  # [B, 1, L]
        inp = AttentionInputs(cos=self.rope_cos[positions].unsqueeze(1),
                              sin=self.rope_sin[positions].unsqueeze(1),
                              mask=mask_bias(mask, self.dtype).unsqueeze(1), write_idx=write_idx,
                              kv_len=kv_len, rows=rows, flex=flex)
        h = self._run(tokens.unsqueeze(1), inp, cache)  # [B, 1, dim]
        return self.output(h[:, 0]).float()
