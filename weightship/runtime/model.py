"""The Mistral transformer (Jiang et al., 2023, "Mistral 7B"), in plain PyTorch.

Four entry points share the layers:
- :meth:`Transformer.forward` scores whole sequences without a cache (the reference path);
- :meth:`Transformer.prefill` runs a chunk of one sequence's prompt into its cache slot;
- :meth:`Transformer.prefill_packed` runs the whole prompts of several new sequences at once;
- :meth:`Transformer.decode` advances rows ``0..B-1`` by one token each. It does no host
  synchronisation and takes only static shapes, so a CUDA graph can capture it
  (:mod:`weightship.runtime.decoding`).

References: mistral-inference ``transformer.py``; gpt-fast ``model.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from weightship.errors import UsageError
from weightship.runtime.args import ModelArgs
from weightship.runtime.attention import DECODE_KERNELS
from weightship.runtime.cache import KVCache
from weightship.runtime.layers import (
    AttentionInputs,
    DecodeInputs,
    PrefillInputs,
    RMSNorm,
    TransformerBlock,
    WholeInputs,
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
        # Given its weight, Embedding skips its random init: on ``meta`` that init alone imports
        # torch._dynamo (1.2 s of a CPU load); the loader's tensors replace the weight anyway.
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim, _weight=torch.empty(a.vocab_size, a.dim))
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

    def set_decode_attention(self, kind: str) -> None:
        """Compute decode attention by ``kind`` (:data:`~weightship.runtime.attention.DECODE_KERNELS`);
        set it before the decode step is compiled."""
        if kind not in DECODE_KERNELS:
            raise UsageError(f"unknown decode attention {kind!r}", hint="one of: " + ", ".join(DECODE_KERNELS))
        for layer in self.layers:
            assert isinstance(layer, TransformerBlock)
            layer.attention.decode_kernel = kind

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
        inp = WholeInputs(cos=self.rope_cos[pos].expand(B, T, -1), sin=self.rope_sin[pos].expand(B, T, -1),
                          mask=mask_bias(mask, self.dtype).expand(B, 1, T, T))
        return self.output(self._run(tokens, inp, None)).float()

    def prefill(self, tokens: torch.Tensor, start: int, slot: int, cache: KVCache,
                all_logits: bool = False) -> torch.Tensor:
        """Run positions ``start .. start+T-1`` of the sequence in ``slot`` into the cache.

        ``tokens`` is [T]. Returns the float32 logits of the last position [vocab], or of every
        position [T, vocab] with ``all_logits``. Chunks must come in order; ``start == 0``
        resets the slot.
        """
        if start == 0:  # a fresh sequence: a pack of one
            logits = self.prefill_packed([tokens], [slot], cache, all_logits)
            return logits if all_logits else logits[0]
        (T,) = tokens.shape
        assert start + T <= self.args.max_model_len, (start, T, self.args.max_model_len)
        pos = torch.arange(start, start + T, device=tokens.device)  # [T]
        # Entries at >= start are stale: an idle decode row may have scribbled on one.
        cached = cache.pos[slot].masked_fill(cache.pos[slot] >= start, -1)  # [C + 1]
        mask = window_mask(pos, torch.cat((cached, pos)), self.args.window)  # [T, C + 1 + T]
        src = torch.arange(max(T - cache.cache_len, 0), T, device=tokens.device)  # the chunk's kept keys
        write_idx = cache.write_index(pos[src])
        inp = PrefillInputs(cos=self.rope_cos[pos].unsqueeze(0), sin=self.rope_sin[pos].unsqueeze(0),
                            mask=mask_bias(mask, self.dtype)[None, None], write_idx=write_idx,
                            rows=torch.full_like(src, slot), src=src, slot=slot)
        h = self._run(tokens.unsqueeze(0), inp, cache)[0]  # [T, dim]
        cache.pos[slot, write_idx] = pos[src]
        return self.output(h if all_logits else h[-1]).float()

    def prefill_packed(self, prompts: Sequence[torch.Tensor], slots: Sequence[int], cache: KVCache,
                       all_logits: bool = False) -> torch.Tensor:
        """Whole prompts of new sequences, ``prompts[i]`` into slot ``slots[i]``, in one pass.

        The prompts are packed into one row of N tokens, each position seeing only its own
        prompt's keys (a block-diagonal mask within the window), so the weights are read once
        for all of them. Returns the float32 logits of each prompt's last position [S, vocab],
        or of every position [N, vocab] (packed in order) with ``all_logits``.
        """
        device = self.device
        lengths = torch.tensor([p.shape[0] for p in prompts], device=device)  # [S]
        assert int(lengths.max()) <= self.args.max_model_len, (lengths, self.args.max_model_len)
        tokens = torch.cat(list(prompts))  # [N]
        seq = torch.repeat_interleave(torch.arange(len(prompts), device=device), lengths)  # [N]
        ends = lengths.cumsum(0)  # [S]
        pos = torch.arange(tokens.shape[0], device=device) - (ends - lengths)[seq]  # [N]
        mask = window_mask(pos, pos, self.args.window) & (seq.unsqueeze(-1) == seq)  # [N, N]
        src = (pos >= lengths[seq] - cache.cache_len).nonzero()[:, 0]  # the keys the buffers keep
        rows = torch.tensor(list(slots), device=device)[seq[src]]
        write_idx = cache.write_index(pos[src])
        for slot in slots:
            cache.reset_slot(slot)
        inp = PrefillInputs(cos=self.rope_cos[pos].unsqueeze(0), sin=self.rope_sin[pos].unsqueeze(0),
                            mask=mask_bias(mask, self.dtype)[None, None], write_idx=write_idx,
                            rows=rows, src=src)
        h = self._run(tokens.unsqueeze(0), inp, cache)[0]  # [N, dim]
        cache.pos[rows, write_idx] = pos[src]
        return self.output(h if all_logits else h[ends - 1]).float()

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               kv_len: int) -> torch.Tensor:
        """One token for each of rows ``0..B-1`` (slot = row): float32 logits [B, vocab].

        ``tokens`` and ``positions`` are [B]; ``kv_len`` cache entries are read per row, which
        must cover every filled entry of those slots (``cache_len`` once any has wrapped).
        Rows whose slot is idle compute garbage that touches only their own slot.
        """
        (B,) = tokens.shape
        rows = torch.arange(B, device=tokens.device)
        write_idx = cache.write_index(positions)
        cache.pos[rows, write_idx] = positions  # before the layers: the mask includes the new key
        k_pos = cache.pos[:B, :kv_len]  # [B, L]
        mask = window_mask(positions.unsqueeze(-1), k_pos, self.args.window)  # [B, 1, L]
        inp = DecodeInputs(cos=self.rope_cos[positions].unsqueeze(1), sin=self.rope_sin[positions].unsqueeze(1),
                           mask=mask_bias(mask, self.dtype).unsqueeze(1), write_idx=write_idx, rows=rows,
                           kv_len=kv_len)
        h = self._run(tokens.unsqueeze(1), inp, cache)  # [B, 1, dim]
        return self.output(h[:, 0]).float()
