"""Validation of safetensors headers, before anything is mmap'd or trusted.

Format (github.com/huggingface/safetensors): 8 bytes little-endian u64 ``N``, then ``N`` bytes of
UTF-8 JSON mapping tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the byte after the header) plus an optional ``__metadata__`` of strings, then the
data. The checks here are those of the reference implementation and a little stricter: the
header is read only after its length is checked against the limit and the file size, and the
tensors must tile the data section exactly — contiguous, non-overlapping, no gap, nothing after.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightship.errors import MalformedWeightsError

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry, offsets relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header."""

    path: Path
    data_start: int  # absolute file offset of the data section (8 + N)
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Builds the error that names the file, from the reason one of the checks below found.
_Bad = Callable[[str], MalformedWeightsError]


def read_header(path: Path, *, label: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Steps: read the length and the header bytes (length checked first), parse them as a JSON
    object, check ``__metadata__``, check each tensor's entry, check that the tensors tile the
    data section. Raises :class:`MalformedWeightsError` naming ``label`` (default: the path) and
    the reason.
    """
    name = label or str(path)

    def bad(reason: str) -> MalformedWeightsError:
        return MalformedWeightsError(name, f"not a valid safetensors file: {reason}")

    file_size, raw = _read_header_bytes(path, bad)
    doc = _parse_header(raw, bad)
    metadata = _check_metadata(doc.pop("__metadata__", None), bad)
    tensors = {tname: _tensor_info(tname, info, bad) for tname, info in doc.items()}
    _check_tiling(tensors.values(), file_size - 8 - len(raw), bad)
    return SafetensorsHeader(path=path, data_start=8 + len(raw), tensors=tensors, metadata=metadata)


def _read_header_bytes(path: Path, bad: _Bad) -> tuple[int, bytes]:
    """(file size, the header's N bytes), the length checked before anything more is read."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"{file_size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n == 0:
            raise bad("header length is 0")
        if n > MAX_HEADER_BYTES:
            raise bad(f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > file_size:
            raise bad(f"header length {n} runs past the end of the {file_size}-byte file")
        raw = f.read(n)
    if len(raw) != n:
        raise bad("file shrank while being read")
    return file_size, raw


def _parse_header(raw: bytes, bad: _Bad) -> dict[str, Any]:
    """The header bytes as a JSON object (UTF-8, starting with ``{``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise bad("header does not start with '{'")
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    return doc


def _check_metadata(metadata: Any, bad: _Bad) -> dict[str, str] | None:
    """``__metadata__`` (absent, or strings to strings)."""
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad("__metadata__ must map strings to strings")
    return metadata


def _tensor_info(tname: str, info: Any, bad: _Bad) -> TensorInfo:
    """One tensor's entry: a known dtype, a shape, offsets whose span is the shape's byte size."""
    if not isinstance(info, dict):
        raise bad(f"entry {tname!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise bad(f"tensor {tname!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"tensor {tname!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and 0 <= o <= _U64_MAX for o in offsets)):
        raise bad(f"tensor {tname!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise bad(f"tensor {tname!r} ends before it begins ({begin} > {end})")
    nbytes = DTYPE_SIZES[dtype]
    for d in shape:
        nbytes *= d
    if nbytes > _U64_MAX:
        raise bad(f"tensor {tname!r}: shape {shape} overflows a 64-bit byte count")
    if nbytes != end - begin:
        raise bad(f"tensor {tname!r}: shape {shape} x {dtype} is {nbytes} bytes, "
                  f"but its offsets span {end - begin}")
    return TensorInfo(tname, dtype, tuple(shape), begin, end)


def _check_tiling(tensors: Iterable[TensorInfo], data_size: int, bad: _Bad) -> None:
    """The tensors, in offset order, cover the ``data_size`` bytes of the data section exactly:
    no overlap, no gap, nothing after the last."""
    cursor = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin < cursor:
            raise bad(f"tensor {t.name!r} overlaps the previous tensor (starts at {t.begin}, "
                      f"previous ends at {cursor})")
        if t.begin > cursor:
            raise bad(f"gap of {t.begin - cursor} bytes before tensor {t.name!r}")
        cursor = t.end
    if cursor != data_size:
        raise bad(f"tensors cover {cursor} bytes but the data section holds {data_size}")
