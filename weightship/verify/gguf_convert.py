"""``weightship convert FILE.gguf --to DIR``: a GGUF's Llama model as a Hugging Face directory.

Steps:
1. :class:`~weightship.verify.gguf.GgufFile` checks the header and every tensor against the file
   (nothing is read or written before that passes);
2. :func:`llama_plan` reads the architecture from the metadata and checks that the tensors are
   exactly a Llama model's, with the shapes it implies (a missing ``output.weight`` means tied
   embeddings) — still before anything is written;
3. the tensors are dequantized one at a time (``gguf.quants``), renamed to the HF layout, the rows
   of ``wq``/``wk`` permuted for HF's rotary convention (llama.cpp stores Meta's interleaved
   order), converted to the dtype asked for (bf16 rounds to nearest even, as torch does) and
   streamed into ``model.safetensors`` under ``DIR/.weightship/incoming/``, hashed on the way;
4. ``config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` (with the GGUF's chat
   template) are written beside it (:mod:`weightship.verify.gguf_tokenizer`);
5. each file is renamed into place and the manifest is written last, naming the GGUF's sha256
   as the source. Everything written is a function of the GGUF's bytes and the dtype: converting
   twice gives the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightship.catalog.architecture import permute_for_hf_rows
from weightship.errors import MalformedGgufError, UnsupportedGgufError, UsageError
from weightship.manifest import FileEntry, Manifest, SourceInfo, utcnow
from weightship.paths import STATE_DIR, dir_beneath, replace_beneath
from weightship.verify.gguf import ArrayInfo, GgufFile
from weightship.verify.gguf_tokenizer import dumps, tokenizer_config, tokenizer_json

DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32"}
WEIGHTS_NAME = "model.safetensors"
_INCOMING = f"{STATE_DIR}/incoming"

# GGUF's names of a Llama block's tensors -> the HF layout's
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


@dataclass(frozen=True)
class LlamaPlan:
    """What a Llama GGUF converts to: the HF config, and each GGUF tensor's HF name and shape."""

    config: dict[str, Any]
    names: dict[str, str]  # GGUF name -> HF name
    shapes: dict[str, tuple[int, ...]]  # GGUF name -> shape (numpy order)
    heads: dict[str, int]  # GGUF name of wq / wk -> its head count (rows permuted for HF)


def _meta(g: GgufFile, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = g.metadata.get(key, default)
    if value is None:
        raise MalformedGgufError(str(g.path), f"metadata {key} is missing")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # a writer may store a whole number as an integer
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MalformedGgufError(str(g.path), f"metadata {key} is {value!r}, not a {getattr(kind, '__name__', kind)}")
    return value


def _float32(x: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def llama_plan(g: GgufFile, dtype: str) -> LlamaPlan:
    """The architecture and tensor names of a Llama GGUF, checked; see the module docstring."""
    path = str(g.path)
    arch = _meta(g, "general.architecture", str)
    if arch != "llama":
        raise UnsupportedGgufError(f"{path}: architecture {arch!r} is not converted", hint="converted: llama")
    n_layers = _meta(g, "llama.block_count", int)
    dim = _meta(g, "llama.embedding_length", int)
    hidden = _meta(g, "llama.feed_forward_length", int)
    n_heads = _meta(g, "llama.attention.head_count", int)
    n_kv = _meta(g, "llama.attention.head_count_kv", int, n_heads)
    for key, value in (("block_count", n_layers), ("embedding_length", dim), ("feed_forward_length", hidden),
                       ("attention.head_count", n_heads), ("attention.head_count_kv", n_kv)):
        if not 0 < value < 1 << 20:
            raise MalformedGgufError(path, f"llama.{key} is {value}")
    if dim % n_heads or n_heads % n_kv:
        raise MalformedGgufError(path, f"{n_heads} heads over {n_kv} KV heads do not divide a width of {dim}")
    head_dim = _meta(g, "llama.attention.key_length", int, dim // n_heads)
    if head_dim % 2 or _meta(g, "llama.rope.dimension_count", int, head_dim) != head_dim or \
            _meta(g, "llama.attention.value_length", int, head_dim) != head_dim:
        raise UnsupportedGgufError(f"{path}: partial or odd rotary dimensions are not converted")
    scaling = g.metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none" or g.metadata.get("llama.expert_count", 0):
        raise UnsupportedGgufError(f"{path}: rope scaling ({scaling}) and mixtures of experts are not converted")
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    vocab = _meta(g, "llama.vocab_size", int, tokens.count if isinstance(tokens, ArrayInfo) else None)

    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if "output.weight" in g.tensors:
        shapes["output.weight"] = (vocab, dim)
    per_block = {"attn_norm": (dim,), "attn_q": (n_heads * head_dim, dim), "attn_k": (n_kv * head_dim, dim),
                 "attn_v": (n_kv * head_dim, dim), "attn_output": (dim, n_heads * head_dim), "ffn_norm": (dim,),
                 "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim), "ffn_down": (dim, hidden)}
    names = {k: _TOP[k] for k in shapes}
    heads = {}
    for i in range(n_layers):
        for part, shape in per_block.items():
            shapes[f"blk.{i}.{part}.weight"] = shape
            names[f"blk.{i}.{part}.weight"] = f"model.layers.{i}.{_BLOCK[part]}.weight"
        heads[f"blk.{i}.attn_q.weight"], heads[f"blk.{i}.attn_k.weight"] = n_heads, n_kv
    missing, extra = sorted(set(shapes) - set(g.tensors)), sorted(set(g.tensors) - set(shapes))
    if missing or extra:
        raise MalformedGgufError(path, f"not a Llama model of {n_layers} layers: missing tensors {missing[:4]}, "
                                       f"unexpected {extra[:4]}")
    for name, shape in shapes.items():
        if g.tensors[name].shape != shape:
            raise MalformedGgufError(path, f"tensor {name} has shape {list(g.tensors[name].shape)}; "
                                           f"the metadata implies {list(shape)}")
    special = {key: g.metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "unknown", "padding")}
    config = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": special["bos"], "eos_token_id": special["eos"], "head_dim": head_dim,
        "hidden_act": "silu", "hidden_size": dim, "initializer_range": 0.02, "intermediate_size": hidden,
        "max_position_embeddings": _meta(g, "llama.context_length", int, 4096), "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": n_heads, "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv, "pretraining_tp": 1,
        "rms_norm_eps": _float32(_meta(g, "llama.attention.layer_norm_rms_epsilon", float)),
        "rope_scaling": None, "rope_theta": _float32(_meta(g, "llama.rope.freq_base", float, 10000.0)),
        "tie_word_embeddings": "output.weight" not in g.tensors, "torch_dtype": dtype, "use_cache": True,
        "vocab_size": vocab,
    }
    return LlamaPlan(config, names, shapes, heads)


def _tokenizer_files(g: GgufFile, plan: LlamaPlan) -> dict[str, bytes]:
    """``tokenizer.json`` and ``tokenizer_config.json`` from the GGUF's vocabulary."""
    path = str(g.path)
    model = _meta(g, "tokenizer.ggml.model", str)
    if model != "gpt2":
        raise UnsupportedGgufError(f"{path}: tokenizer {model!r} is not converted",
                                   hint="converted: gpt2 (byte-level BPE)")
    tokens = g.array("tokenizer.ggml.tokens")
    types = g.array("tokenizer.ggml.token_type") if "tokenizer.ggml.token_type" in g.metadata else []
    merges = g.array("tokenizer.ggml.merges")
    if len(tokens) != plan.config["vocab_size"] or not all(isinstance(t, str) for t in tokens + merges):
        raise MalformedGgufError(path, f"{len(tokens)} tokens of text for a vocabulary of {plan.config['vocab_size']}")
    special: dict[str, int | None] = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = g.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and (not isinstance(token_id, int) or not 0 <= token_id < len(tokens)):
            raise MalformedGgufError(path, f"tokenizer.ggml.{key}_token_id {token_id!r} is not a token")
        special[name] = token_id
    template = g.metadata.get("tokenizer.chat_template")
    pre = g.metadata.get("tokenizer.ggml.pre")
    return {
        "tokenizer.json": dumps(tokenizer_json(path, tokens, types, merges, pre if isinstance(pre, str) else None)),
        "tokenizer_config.json": dumps(tokenizer_config(
            tokens, special, add_bos=bool(g.metadata.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(g.metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=template if isinstance(template, str) else None,
            max_length=plan.config["max_position_embeddings"])),
    }


def to_dtype(x: np.ndarray, dtype: str) -> bytes:
    """float32 ``x`` as little-endian bytes of ``dtype`` (bf16: round to nearest even, NaN kept)."""
    if dtype == "float32":
        return x.astype("<f4").tobytes()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = x.astype("<f2")
        if not np.isfinite(out).all() and np.isfinite(x).all():
            raise UsageError("a weight is too large for float16", hint="convert with --dtype bfloat16")
        return out.tobytes()
    bits = x.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isnan(x), (bits >> 16) | 0x40, rounded)  # a NaN stays a (quiet) NaN
    return rounded.astype("<u2").tobytes()


def _safetensors_header(plan: LlamaPlan, dtype: str, metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header of ``model.safetensors`` (tensors by HF name, in name order) and that order."""
    size = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    order = sorted(plan.names, key=lambda k: plan.names[k])
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for gguf_name in order:
        shape = plan.shapes[gguf_name]
        n = size * int(np.prod(shape))
        entries[plan.names[gguf_name]] = {"data_offsets": [offset, offset + n], "dtype": DTYPES[dtype],
                                          "shape": list(shape)}
        offset += n
    header = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header, order


def _hf_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """Meta's interleaved rotary rows (what llama.cpp stores) in the HF layout's order."""
    return x[permute_for_hf_rows(x.shape[0], heads)]


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "bfloat16", name: str | None = None,
                 manifest: Manifest | None = None, source: str | None = None,
                 progress: Callable[[str], None] | None = None) -> Manifest:
    """Convert ``gguf_path`` into ``out_dir``; see the module docstring. Returns the manifest.

    ``manifest``: add the converted files to this one (a fetched directory holding the GGUF; the
    caller writes it) instead of writing a new one named ``name``; ``source`` names the GGUF in
    the entries.
    """
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use one of: " + ", ".join(DTYPES))
    g = GgufFile(gguf_path)
    plan = llama_plan(g, dtype)
    gguf_sha = _sha256_file(gguf_path)
    texts = {"config.json": dumps(plan.config), **_tokenizer_files(g, plan)}
    label = source or gguf_path.name
    header, order = _safetensors_header(plan, dtype, {"format": "pt", "converted_from": gguf_path.name,
                                                      "converted_from_sha256": gguf_sha})
    created = [d for d in (out_dir, out_dir / STATE_DIR, out_dir / _INCOMING) if not d.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, tuple[int, str]] = {}
    try:
        with dir_beneath(out_dir, _INCOMING, create=True) as incoming:
            with _staging(incoming, WEIGHTS_NAME) as (f, h):
                f.write(header)
                h.update(header)
                for gguf_name in order:
                    if progress:
                        progress(gguf_name)
                    x = g.tensor(gguf_name)
                    if gguf_name in plan.heads:
                        x = _hf_rows(x, plan.heads[gguf_name])
                    data = to_dtype(x, dtype)
                    f.write(data)
                    h.update(data)
                staged[WEIGHTS_NAME] = (f.tell(), h.hexdigest())
            for rel, data in texts.items():
                with _staging(incoming, rel) as (f, h):
                    f.write(data)
                    staged[rel] = (len(data), hashlib.sha256(data).hexdigest())
        for rel in staged:
            replace_beneath(out_dir, f"{_INCOMING}/{rel}.incomplete", rel)
    finally:
        for rel in set(texts) | {WEIGHTS_NAME}:
            (out_dir / _INCOMING / f"{rel}.incomplete").unlink(missing_ok=True)
        for d in reversed(created):  # what this call made, if it is empty again (a failure)
            with contextlib.suppress(OSError):
                d.rmdir()
    result = manifest or Manifest(name=name or gguf_path.stem, files=[], layout="hf",
                                  source=SourceInfo(kind="convert", uri=gguf_path.name, revision=gguf_sha))
    for rel, (size, sha) in staged.items():
        result.upsert(FileEntry(path=rel, size=size, sha256=sha, source=f"convert:{label}@sha256:{gguf_sha}",
                                anchor="convert"))
    result.verified_at = utcnow()
    if manifest is None:
        result.write(out_dir)
    return result


class _staging:
    """``DIR/.weightship/incoming/REL.incomplete`` opened for writing, with a running sha256;
    fsynced when closed."""

    def __init__(self, incoming: int, rel: str) -> None:
        self.fd = os.open(f"{rel}.incomplete", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o644, dir_fd=incoming)
        self.file = os.fdopen(self.fd, "wb", buffering=1 << 20)
        self.hash = hashlib.sha256()

    def __enter__(self) -> tuple[Any, Any]:
        return self.file, self.hash

    def __exit__(self, *exc: object) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()

