"""The embedded ``weightship-tiny`` model: a Mistral-architecture model made from a fixed seed.

Its catalog card pins the sha256 of every file, so every byte written here must be the same on
every machine and with every library version. Hence:

- the weights come from SplitMix64 (Steele et al., 2014) run on numpy ``uint64`` arrays, one
  counter-based stream per tensor, and each value is ``k * 2**-e`` for a small integer ``k``:
  exactly representable in bfloat16, so no floating-point rounding is involved anywhere;
- the safetensors file is laid out here (sorted names, a compact JSON header padded to 8 bytes)
  rather than by a library whose header order or padding may change between releases;
- ``consolidated.00.pth`` is the archive format ``torch.save`` writes (a zip of ``data.pkl``
  and one record per storage), but assembled here: a pickle of fixed opcodes and a zip with
  fixed timestamps and 64-byte-aligned records, because ``torch.save``'s own archive changes
  between releases. ``torch.load(weights_only=True, mmap=True)`` reads it.

The ``original`` layout holds the same model as the ``hf`` layout, with the HF rotary row
permutation undone, so converting one into the other is exercised end to end.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import pickle
import struct
import zipfile
from collections.abc import Iterator

import numpy as np

from weightship.catalog.architecture import (
    Architecture,
    original_to_hf_name,
    permute_for_hf_rows,
)

TOKENIZER_RESOURCE = "tokenizer.model.v1"  # Mistral's v1 SentencePiece model (DESIGN.md)

# Each tensor kind draws k from a range and scales it by 2**-exponent (values listed as the
# half-width of a uniform distribution): close to the 1/sqrt(fan_in) of the usual inits, so
# activations stay O(1) and the model produces varied, fluent nonsense.
_EMBED_EXP = 7  # ~ +-1.0
_PROJ_EXP = 10  # ~ +-0.125, fan_in = dim
_DOWN_EXP = 11  # ~ +-0.0625, fan_in = hidden_dim
_OUTPUT_EXP = 9  # ~ +-0.25: logits with a std of ~1.6 at dim 128

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(stream: int, n: int) -> np.ndarray:
    """``n`` successive SplitMix64 outputs of the stream seeded with ``stream``."""
    z = np.uint64(stream) + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _bf16_bits(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The bfloat16 bit patterns (``uint16``) of one original-layout tensor."""
    n = 1
    for d in shape:
        n *= d
    top = (_splitmix64(_stream(seed, name), n) >> np.uint64(56)).astype(np.int32)  # [0, 255]
    if name.endswith("norm.weight"):
        k, exp = 96 + (top >> 2), 7  # [0.75, 1.24]: norms near one, but not all equal
    elif name == "tok_embeddings.weight":
        k, exp = top - 128, _EMBED_EXP
    elif name == "output.weight":
        k, exp = top - 128, _OUTPUT_EXP
    elif name.endswith("feed_forward.w2.weight"):
        k, exp = top - 128, _DOWN_EXP
    else:
        k, exp = top - 128, _PROJ_EXP
    # |k| <= 255 fits bfloat16's 8-bit significand, so k * 2**-exp is exact in float32 and its
    # upper 16 bits are its exact bfloat16 encoding.
    values = k.astype(np.float32) * np.float32(2.0**-exp)
    return (values.view(np.uint32) >> np.uint32(16)).astype("<u2").reshape(shape)


def original_tensors(arch: Architecture, seed: int) -> dict[str, np.ndarray]:
    """The model's tensors under original-layout names, as ``uint16`` bfloat16 bit patterns."""
    return {name: _bf16_bits(name, shape, seed)
            for name, shape in sorted(arch.tensor_shapes("original").items())}


def hf_tensors(arch: Architecture, seed: int) -> dict[str, np.ndarray]:
    """The same model under HF-layout names, ``wq``/``wk`` rows permuted for HF's rotary."""
    out: dict[str, np.ndarray] = {}
    for name, bits in original_tensors(arch, seed).items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = arch.n_heads if name.endswith("wq.weight") else arch.n_kv_heads
            bits = bits[permute_for_hf_rows(bits.shape[0], heads)]
        out[original_to_hf_name(name)] = bits
    return dict(sorted(out.items()))


# ---- containers ------------------------------------------------------------------------------


def safetensors_bytes(tensors: dict[str, np.ndarray], dtype: str = "BF16") -> bytes:
    """A safetensors file of ``tensors`` (all of one dtype), laid out the same way every time."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    chunks = [struct.pack("<Q", len(raw)), raw]
    chunks += [np.ascontiguousarray(tensors[name]).tobytes() for name in sorted(tensors)]
    return b"".join(chunks)


def _pickle_int(v: int) -> bytes:
    if 0 <= v < 2**31:
        return pickle.BININT + struct.pack("<i", v)
    payload = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(payload)]) + payload


def _pickle_str(s: str) -> bytes:
    raw = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _pickle_tuple(items: Iterator[bytes] | list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _state_dict_pickle(tensors: dict[str, np.ndarray]) -> bytes:
    """``data.pkl`` for a dict of bfloat16 tensors, one storage each, keys "0", "1", …

    The opcodes are the ones ``torch.save`` emits for ``_rebuild_tensor_v2`` (protocol 2).
    """
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.MARK]
    for key, (name, t) in enumerate(tensors.items()):
        stride: list[int] = []
        acc = 1
        for d in reversed(t.shape):
            stride.insert(0, acc)
            acc *= d
        storage = _pickle_tuple([_pickle_str("storage"), pickle.GLOBAL + b"torch\nBFloat16Storage\n",
                                 _pickle_str(str(key)), _pickle_str("cpu"), _pickle_int(t.size)])
        args = _pickle_tuple([
            storage + pickle.BINPERSID,
            _pickle_int(0),
            _pickle_tuple(_pickle_int(d) for d in t.shape),
            _pickle_tuple(_pickle_int(s) for s in stride),
            pickle.NEWFALSE,
            pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE,
        ])
        out += [_pickle_str(name), pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n", args,
                pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


_ALIGN = 64  # torch aligns storage records so that mmap'd tensors are aligned


def pth_bytes(tensors: dict[str, np.ndarray], archive: str = "consolidated") -> bytes:
    """A ``torch.save``-format archive of bfloat16 ``tensors``, byte-identical on every run."""
    buf = io.BytesIO()
    records = [("data.pkl", _state_dict_pickle(tensors)), ("byteorder", b"little")]
    records += [(f"data/{i}", np.ascontiguousarray(t).tobytes()) for i, t in enumerate(tensors.values())]
    records += [("version", b"3\n")]
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 0
            info.external_attr = 0
            # Pad the local header with an extra field so the record's data starts aligned.
            header_end = buf.tell() + 30 + len(info.filename.encode()) + 4
            pad = -header_end % _ALIGN
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, data)
    return buf.getvalue()


# ---- the model's files -----------------------------------------------------------------------


def tokenizer_bytes() -> bytes:
    """Mistral's v1 tokenizer, shipped as package data."""
    return (importlib.resources.files("weightship.catalog") / "data" / TOKENIZER_RESOURCE).read_bytes()


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def tiny_files(arch: Architecture, seed: int, layout: str) -> dict[str, bytes]:
    """Every file of the tiny model in ``layout`` ("hf" or "original"), by relative path."""
    if layout == "hf":
        return {
            "config.json": _json_bytes(arch.to_hf_config()),
            "model.safetensors": safetensors_bytes(hf_tensors(arch, seed)),
            "tokenizer.model": tokenizer_bytes(),
        }
    if layout == "original":
        return {
            "params.json": _json_bytes(arch.to_params_json()),
            "consolidated.00.pth": pth_bytes(original_tensors(arch, seed)),
            "tokenizer.model": tokenizer_bytes(),
        }
    raise ValueError(f"unknown layout {layout!r}")
