"""Small GGUF files for the tests, written with llama.cpp's own writer (PyPI ``gguf``): a tiny
Llama model with a byte-level BPE vocabulary and ChatML template, its tensors in every type
``convert`` reads; and byte-level damage to such a file at a named field."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "e r", "o n"]
DIM, LAYERS, HEADS, KV_HEADS, HIDDEN = 64, 2, 4, 2, 96
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def vocabulary() -> list[str]:
    from weightship.verify.gguf_tokenizer import byte_alphabet

    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIAL + list(byte_alphabet().values()) + merged


def write_tiny_llama(path: Path, *, seed: int = 0, tied: bool = True, types: tuple[str, ...] = TYPES,
                     extra_kv: dict[str, int] | None = None) -> Path:
    """A random-weight Llama GGUF: 2 layers, width 64, 4 heads over 2 KV heads; its matrices
    cycle through ``types``, the norms stay F32 (as llama.cpp writes them)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    tokens = vocabulary()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for key, value in (extra_kv or {}).items():
        w.add_uint32(key, value)
    rng = np.random.default_rng(seed)
    hd = DIM // HEADS
    shapes = {"token_embd.weight": (len(tokens), DIM), "output_norm.weight": (DIM,)}
    if not tied:
        shapes["output.weight"] = (len(tokens), DIM)
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.attn_q.weight": (HEADS * hd, DIM),
                   f"blk.{i}.attn_k.weight": (KV_HEADS * hd, DIM), f"blk.{i}.attn_v.weight": (KV_HEADS * hd, DIM),
                   f"blk.{i}.attn_output.weight": (DIM, HEADS * hd), f"blk.{i}.ffn_norm.weight": (DIM,),
                   f"blk.{i}.ffn_gate.weight": (HIDDEN, DIM), f"blk.{i}.ffn_up.weight": (HIDDEN, DIM),
                   f"blk.{i}.ffn_down.weight": (DIM, HIDDEN)}
    matrices = 0
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        x = (0.08 * rng.standard_normal(shape)).astype(np.float32)
        kind = types[matrices % len(types)]
        matrices += 1
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            q = Q[kind]
            w.add_tensor(name, gguf.quants.quantize(x, q), raw_shape=gguf.quants.quant_shape_to_byte_shape(shape, q),
                         raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_field(data: bytes, name: str) -> tuple[int, int]:
    """(offset of the dimension count, number of dimensions) of tensor ``name``'s info."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    return at, struct.unpack_from("<I", data, at)[0]


def patch_tensor(data: bytes, name: str, *, dims: list[int] | None = None, type_id: int | None = None,
                 offset: int | None = None) -> bytes:
    """``data`` with tensor ``name``'s dimensions, type or offset rewritten in place."""
    buf = bytearray(data)
    at, n_dims = tensor_field(data, name)
    if dims is not None:
        assert len(dims) == n_dims
        struct.pack_into(f"<{n_dims}Q", buf, at + 4, *dims)
    if type_id is not None:
        struct.pack_into("<I", buf, at + 4 + 8 * n_dims, type_id)
    if offset is not None:
        struct.pack_into("<Q", buf, at + 8 + 8 * n_dims, offset)
    return bytes(buf)


def tensor_offset(data: bytes, name: str) -> int:
    at, n_dims = tensor_field(data, name)
    return int(struct.unpack_from("<Q", data, at + 8 + 8 * n_dims)[0])


def patch_array_length(data: bytes, key: str, count: int) -> bytes:
    """``data`` with metadata array ``key`` claiming ``count`` elements."""
    buf = bytearray(data)
    raw = struct.pack("<Q", len(key)) + key.encode()
    at = data.index(raw) + len(raw)
    assert struct.unpack_from("<I", data, at)[0] == 9, "not an array"
    struct.pack_into("<Q", buf, at + 8, count)
    return bytes(buf)
