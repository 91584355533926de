"""Reading a GGUF file (llama.cpp's format) without trusting it.

A GGUF is a header (magic, version, counts), key/value metadata, tensor infos (name, dimensions,
type, offset) and the tensor data, aligned. llama.cpp's own Python reader (PyPI ``gguf``,
:class:`gguf.GGUFReader`) parses all of it as it is told: an array that claims 2^60 elements is
looped over, a tensor past the end of the file becomes a numpy error. So a file is read in two
passes:

1. :func:`scan` walks the header itself with ``struct`` over a memory map, bounding everything by
   the bytes that are really there: known value types, lengths that fit, arrays of at most
   ``MAX_ARRAY`` elements, at most ``MAX_TENSORS`` tensors of at most 4 dimensions and
   ``MAX_ELEMENTS`` elements, each of a type this module dequantizes, aligned, inside the file and
   overlapping no other. A file that fails gets :class:`~weightship.errors.MalformedGgufError` at
   once (no allocation beyond the header's own size);
2. only then :class:`GgufFile` hands the file to ``GGUFReader``, checks that it read the same
   tensors, and dequantizes them with ``gguf.quants`` (llama.cpp's reference code).

Reference: the GGUF specification, ggml ``docs/gguf.md``.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from weightship.errors import MalformedGgufError, UnsupportedGgufError

MAGIC = b"GGUF"
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 16
MAX_ARRAY = 1 << 22  # elements of one metadata array: vocabularies and merge lists are < 1M
MAX_STRING = 16 << 20  # bytes of one metadata string (a chat template is a few KB)
MAX_ELEMENTS = 1 << 36  # of one tensor: 64 G values, far past any model this reads
MAX_ALIGNMENT = 1 << 16

# value type id -> struct format (little-endian); 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9

# ggml type id -> (name, elements per block, bytes per block): the types converted
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34),
         2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20)}


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array, located but not decoded."""

    type: int  # element value type
    count: int
    offset: int  # of its first element


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it, checked against the file."""

    name: str
    type: int  # ggml type id, one of TYPES
    shape: tuple[int, ...]  # numpy order (the header lists ggml's ne[0] first: reversed here)
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPES[self.type][0]


@dataclass(frozen=True)
class Header:
    """What :func:`scan` found: version, metadata (scalars and strings decoded, arrays located)
    and every tensor."""

    version: int
    metadata: dict[str, Any]  # key -> int | float | bool | str | ArrayInfo
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    alignment: int


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, reason: str) -> MalformedGgufError:
        return MalformedGgufError(self.path, reason)

    def take(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise self.fail(f"truncated: {what} at byte {self.pos} runs past the end ({self.size} bytes)")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.take("<Q", f"the length of {what}")
        if n > limit or self.pos + n > self.size:
            raise self.fail(f"{what} claims {n} bytes" + (f", more than the {limit} allowed" if n > limit
                                                          else f"; {self.size - self.pos} are left"))
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at byte {self.pos}; "
                            f"{self.size - self.pos} are left")
        self.pos += n


def _value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        return cur.take(_SCALARS[vtype], key)
    if vtype == STRING:
        return cur.string(f"the value of {key}")
    if vtype != ARRAY:
        raise cur.fail(f"{key} has unknown value type {vtype}")
    etype = cur.take("<I", f"the element type of {key}")
    count = cur.take("<Q", f"the length of {key}")
    if count > MAX_ARRAY:
        raise cur.fail(f"metadata array {key} claims {count:,} elements; at most {MAX_ARRAY:,} are read")
    start = cur.pos
    if etype in _SCALARS:
        cur.skip(count * struct.calcsize(_SCALARS[etype]), f"the {count:,} elements of {key}")
    elif etype == STRING:
        for i in range(count):
            n = cur.take("<Q", f"element {i} of {key}")
            cur.skip(n, f"element {i} of {key}")
    else:  # arrays of arrays: llama.cpp writes none
        raise cur.fail(f"metadata array {key} has elements of type {etype}")
    return ArrayInfo(etype, count, start)


def scan(path: Path) -> Header:
    """Check a GGUF file's header against the file; see the module docstring."""
    label = str(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise MalformedGgufError(label, f"truncated: {size} bytes, too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _scan(_Cursor(buf, label))
    except OSError as e:
        raise MalformedGgufError(label, f"cannot read it: {e.strerror or e}") from e


def _scan(cur: _Cursor) -> Header:
    if bytes(cur.buf[:4]) != MAGIC:
        raise cur.fail("not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.take("<I", "the version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise cur.fail(f"GGUF version {version} is not supported (2 and 3 are){hint}")
    n_tensors = cur.take("<Q", "the tensor count")
    n_keys = cur.take("<Q", "the metadata count")
    if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS:
        raise cur.fail(f"claims {n_tensors:,} tensors and {n_keys:,} metadata keys; at most "
                       f"{MAX_TENSORS:,} of each are read")
    metadata: dict[str, Any] = {}
    for i in range(n_keys):
        key = cur.string(f"metadata key {i}", limit=1 << 16)
        vtype = cur.take("<I", f"the type of {key}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = _value(cur, vtype, key)
    alignment = metadata.get("general.alignment", 32)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= MAX_ALIGNMENT
            or alignment & (alignment - 1)):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two up to {MAX_ALIGNMENT}")
    raw = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}", limit=256)
        n_dims = cur.take("<I", f"the dimension count of {name}")
        if not 1 <= n_dims <= 4:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions (1 to 4 allowed)")
        dims = [cur.take("<Q", f"a dimension of {name}") for _ in range(n_dims)]
        raw.append((name, dims, cur.take("<I", f"the type of {name}"), cur.take("<Q", f"the offset of {name}")))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = [_tensor(cur, name, dims, ggml_type, offset, data_offset, alignment)
               for name, dims, ggml_type, offset in raw]
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise cur.fail(f"tensor {t.name!r} appears twice")
        seen.add(t.name)
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in itertools.pairwise(ordered):
        if a.offset + a.nbytes > b.offset:
            raise cur.fail(f"tensors {a.name} and {b.name} overlap (bytes {b.offset}..{a.offset + a.nbytes})")
    return Header(version, metadata, tuple(tensors), data_offset, alignment)


def _tensor(cur: _Cursor, name: str, dims: list[int], ggml_type: int, offset: int, data_offset: int,
            alignment: int) -> TensorInfo:
    if ggml_type not in TYPES:
        known = ", ".join(n for n, _, _ in TYPES.values())
        raise UnsupportedGgufError(f"{cur.path}: tensor {name} has ggml type {ggml_type}, which "
                                   f"weightship does not dequantize", hint=f"types converted: {known}")
    _, block, block_bytes = TYPES[ggml_type]
    elements = 1
    for d in dims:
        if d < 1:
            raise cur.fail(f"tensor {name} has a dimension of {d}")
        elements *= d
        if elements > MAX_ELEMENTS:
            raise cur.fail(f"tensor {name} has absurd dimensions {dims} (over {MAX_ELEMENTS:,} elements)")
    if dims[0] % block:
        raise cur.fail(f"tensor {name}: a row of {dims[0]} is not whole {TYPES[ggml_type][0]} blocks of {block}")
    nbytes = elements // block * block_bytes
    start = data_offset + offset
    if offset % alignment:
        raise cur.fail(f"tensor {name}'s offset {offset} is not aligned to {alignment}")
    if start + nbytes > cur.size:
        raise cur.fail(f"tensor {name} (bytes {start}..{start + nbytes}) lies past the end of the file "
                       f"({cur.size} bytes)")
    return TensorInfo(name, ggml_type, tuple(reversed(dims)), start, nbytes)


class GgufFile:
    """A GGUF file whose header :func:`scan` accepted, read through ``gguf.GGUFReader``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = scan(path)
        self.metadata = self.header.metadata
        self.tensors = {t.name: t for t in self.header.tensors}

    @cached_property
    def reader(self) -> Any:
        """llama.cpp's reader over the same file, after the header passed :func:`scan`."""
        import gguf

        try:
            reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, OSError) as e:  # scan let through what it refuses
            raise MalformedGgufError(str(self.path), f"gguf could not read it: {e}") from e
        theirs = {t.name: (int(t.data_offset), int(t.n_bytes), int(t.tensor_type)) for t in reader.tensors}
        ours = {t.name: (t.offset, t.nbytes, t.type) for t in self.header.tensors}
        if theirs != ours:
            raise MalformedGgufError(str(self.path), "gguf reads other tensors than its header describes")
        return reader

    @cached_property
    def _data(self) -> dict[str, np.ndarray]:
        return {t.name: t.data for t in self.reader.tensors}

    def array(self, key: str) -> list[Any]:
        """A metadata array's elements (decoded by ``gguf``)."""
        info = self.metadata.get(key)
        if not isinstance(info, ArrayInfo):
            raise MalformedGgufError(str(self.path), f"{key} is missing or not an array")
        field = self.reader.fields[key]
        if info.count == 0:
            return []
        values = field.contents()
        return [v.item() if isinstance(v, np.generic) else v for v in values]

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32, in numpy order (rows of ggml's ne[0] values)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        out = dequantize(np.asarray(self._data[name]), GGMLQuantizationType(info.type))
        return np.ascontiguousarray(out, dtype=np.float32).reshape(info.shape)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Every tensor, dequantized, one at a time."""
        for info in self.header.tensors:
            yield info, self.tensor(info.name)
