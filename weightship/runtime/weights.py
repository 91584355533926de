"""Safetensors weights into the model's tensors, each byte copied once.

The model's tensors are allocated once, in their final form: ``wq``/``wk``/``wv`` as row slices
of one fused ``wqkv`` tensor and ``w1``/``w3`` of one ``w13`` (what :meth:`Transformer.fuse`
wants, so it fuses without a copy), on the target device and in the target dtype. Each tensor's
bytes then go there in one pass, the dtype conversion and the HF layout's rotary row
permutation (as a strided view) done by that same copy:

- **CPU**: from the file mapped into memory (``mmap``, its page tables filled in one call), so
  the only host copy is the destination itself. Where nothing needs converting (same dtype, no
  permutation, not part of a fused tensor, or parts already back to back in the file) the
  parameter *is* the mapped file: no copy at all, the page cache holds the only one.
- **CUDA**: parallel ``pread`` calls fill a ring of pinned host buffers while the buffers read
  before them are copied to the device asynchronously; a tensor that needs converting lands in
  a device scratch buffer first and is converted there. Host memory holds the page cache and
  the ring, never a second copy of the model.

The old path (``safe_open`` → ``.to(dtype)`` → permute → ``torch.cat`` to fuse) wrote the fused
weights three times; its tensors and these are bit for bit the same (tests/runtime).
References: safetensors' format (github.com/huggingface/safetensors); gpt-fast loads with
``torch.load(mmap=True, assign=True)`` for the same reason.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightship.catalog.architecture import Architecture, hf_to_original_name
from weightship.errors import CatalogError, MalformedWeightsError
from weightship.verify.safetensors import read_header

log = logging.getLogger(__name__)

# safetensors dtype names → torch; weights in any other dtype are refused.
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
             "F64": torch.float64}
# Fused destinations: the name of the fused tensor → its parts, in row order (see layers.py).
FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}
# CUDA staging: bytes per pinned buffer, buffers in the ring, reader threads. Four readers keep
# an NVMe drive's queue busy on a cold start; 4 x 64 MiB of pinned memory is all the host holds.
CHUNK_BYTES = 64 << 20
RING = 4
READERS = 4
_MADV_POPULATE_READ = 22  # Linux 5.14: fill a mapping's page tables in one call


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor (original-layout name) lies in the weight files."""

    name: str
    path: Path
    offset: int  # absolute file offset of its first byte
    nbytes: int
    dtype: torch.dtype  # as stored
    shape: tuple[int, ...]
    hf_heads: int | None = None  # rows in the HF rotary order, for this many heads (wq/wk)


def plan_sources(weights: tuple[Path, ...], layout: str, arch: Architecture) -> dict[str, TensorSource]:
    """Every tensor of ``arch`` in ``weights``, by original-layout name, its headers validated
    and its names and shapes checked against the architecture."""
    expected = arch.tensor_shapes("original")
    sources: dict[str, TensorSource] = {}
    for path in weights:
        header = read_header(path)  # MalformedWeightsError names the file and the reason
        for info in header.tensors.values():
            name = info.name
            if layout == "hf":
                try:
                    name = hf_to_original_name(name)
                except CatalogError:
                    raise MalformedWeightsError(str(path), f"unexpected tensor {info.name!r}") from None
            if name in sources:
                raise MalformedWeightsError(str(path), f"tensor {name!r} appears twice")
            if info.dtype not in ST_DTYPES:
                raise MalformedWeightsError(str(path), f"tensor {info.name!r} is {info.dtype}; the "
                                                       "runtime loads BF16, F16, F32 and F64 weights")
            heads = None
            if layout == "hf" and name.endswith(("attention.wq.weight", "attention.wk.weight")):
                heads = arch.n_heads if name.endswith("wq.weight") else arch.n_kv_heads
            sources[name] = TensorSource(name, path, header.data_start + info.begin,
                                         info.end - info.begin, ST_DTYPES[info.dtype], info.shape, heads)
    missing, extra = set(expected) - set(sources), set(sources) - set(expected)
    if missing or extra:
        raise MalformedWeightsError(str(weights[0].parent),
                                    f"missing tensors {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    for name, shape in expected.items():
        if sources[name].shape != shape:
            raise MalformedWeightsError(str(weights[0].parent),
                                        f"{name} has shape {sources[name].shape}, expected {shape}")
    return sources


def unpermute_view(src: torch.Tensor, heads: int) -> torch.Tensor:
    """The original-layout rows of an HF-layout ``wq``/``wk`` ``src`` [H*D, dim], as a strided
    view [H, D/2, 2, dim]: HF row (h, s, i) holds original row (h, i, s) (see
    :func:`~weightship.catalog.architecture.permute_for_hf_rows`); copy it into a destination
    viewed the same way."""
    rows, dim = src.shape
    return src.view(heads, 2, rows // heads // 2, dim).transpose(1, 2)  # [H, D/2, 2, dim]


def _copy_into(dst: torch.Tensor, src: torch.Tensor, heads: int | None) -> None:
    """``dst`` [rows, ...] = ``src`` converted to ``dst``'s dtype, its rows un-permuted."""
    if heads is None:
        dst.copy_(src)
    else:
        dst.view(heads, -1, 2, dst.shape[-1]).copy_(unpermute_view(src, heads))


@dataclass
class _Destinations:
    """The tensors being filled: each name's destination, a row slice of a fused tensor or its own."""

    views: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> destination

    @classmethod
    def allocate(cls, sources: dict[str, TensorSource], dtype: torch.dtype, device: torch.device,
                 mapped: dict[Path, torch.Tensor] | None) -> _Destinations:
        """Destinations for ``sources``; with ``mapped`` (CPU), views of the mapped files
        wherever the bytes already are what the model wants."""
        out = cls()
        grouped: set[str] = set()
        for i in _layers(sources):
            for fused, parts in FUSED.items():
                names = [f"layers.{i}.{p}.weight" for p in parts]
                grouped |= set(names)
                srcs = [sources[n] for n in names]
                whole = _mapped_run(srcs, dtype, mapped) if mapped is not None else None
                if whole is None:
                    rows = sum(s.shape[0] for s in srcs)
                    whole = torch.empty((rows, srcs[0].shape[1]), dtype=dtype, device=device)
                    log.debug("layer %d %s: allocated [%d, %d]", i, fused, rows, srcs[0].shape[1])
                for n, part in zip(names, whole.split([s.shape[0] for s in srcs]), strict=True):
                    out.views[n] = part
        for name, s in sources.items():
            if name in grouped:
                continue
            view = _mapped_run([s], dtype, mapped) if mapped is not None else None
            out.views[name] = (view if view is not None
                               else torch.empty(s.shape, dtype=dtype, device=device))
        return out


def _layers(sources: dict[str, TensorSource]) -> list[int]:
    return sorted({int(n.split(".")[1]) for n in sources if n.startswith("layers.")})


def _mapped_run(srcs: list[TensorSource], dtype: torch.dtype,
                mapped: dict[Path, torch.Tensor] | None) -> torch.Tensor | None:
    """``srcs`` as one tensor viewing the mapped file, if they lie back to back in it as the
    model wants them (the dtype, no row permutation, aligned); else None."""
    if mapped is None:
        return None
    first = srcs[0]
    offset = first.offset
    for s in srcs:
        if (s.path != first.path or s.dtype != dtype or s.hf_heads is not None
                or s.offset != offset or s.shape[1:] != first.shape[1:]):
            return None
        offset += s.nbytes
    if first.offset % dtype.itemsize:
        return None
    rows = sum(s.shape[0] for s in srcs)
    raw = mapped[first.path][first.offset : offset]
    return raw.view(dtype).view((rows, *first.shape[1:]))


# ---- CPU: from the mapped files ----------------------------------------------------------------


def _map_file(path: Path) -> torch.Tensor:
    """The whole file as a uint8 tensor over a private mapping (copy-on-write, never written)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    # Page tables in one call rather than a fault per 4 KiB page later (~1 s/GiB here); kernels
    # before 5.14 refuse it, and the pages fault in as they are read.
    with contextlib.suppress(OSError):
        mm.madvise(_MADV_POPULATE_READ)
    return torch.frombuffer(mm, dtype=torch.uint8)  # keeps ``mm`` alive as long as any view


def load_mapped(sources: dict[str, TensorSource], dtype: torch.dtype,
                threads: int | None = None) -> dict[str, torch.Tensor]:
    """The weights on the CPU: views of the mapped files where they can be, else one copy."""
    mapped = {path: _map_file(path) for path in {s.path for s in sources.values()}}
    dest = _Destinations.allocate(sources, dtype, torch.device("cpu"), mapped)
    jobs: list[tuple[torch.Tensor, torch.Tensor, TensorSource]] = []
    for name, s in sorted(sources.items(), key=lambda kv: (str(kv[1].path), kv[1].offset)):
        dst = dest.views[name]
        raw = mapped[s.path][s.offset : s.offset + s.nbytes]
        if dst.data_ptr() != raw.data_ptr():  # else the parameter is the file's bytes
            jobs.append((dst, raw, s))

    inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

    def copy(job: tuple[torch.Tensor, torch.Tensor, TensorSource]) -> None:
        dst, raw, s = job
        with torch.inference_mode(inference):
            if s.offset % s.dtype.itemsize:
                raw = raw.clone()  # a misaligned tensor: viewable only once copied
            _copy_into(dst, raw.view(s.dtype).view(s.shape), s.hf_heads)

    # Several tensors at once: a copy into fresh memory waits on page faults as much as on the
    # memory bus, and copy_ releases the GIL.
    with ThreadPoolExecutor(threads or os.cpu_count() or 1, thread_name_prefix="weightship-copy") as pool:
        list(pool.map(copy, jobs))
    log.debug("weights: %d of %d bytes copied, the rest mapped", sum(j[2].nbytes for j in jobs),
              sum(s.nbytes for s in sources.values()))
    return dest.views


# ---- CUDA: pinned ring, parallel reads, asynchronous copies -------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """Bytes [start, start + nbytes) of one tensor, read from ``path`` at ``offset``."""

    path: Path
    offset: int
    nbytes: int
    start: int  # within the tensor's bytes


def _chunks(s: TensorSource, size: int) -> Iterator[_Chunk]:
    for start in range(0, s.nbytes, size):
        n = min(size, s.nbytes - start)
        yield _Chunk(s.path, s.offset + start, n, start)


class _Ring:
    """``RING`` host buffers that reader threads fill with ``pread`` while the device copies out
    of the others; a buffer is reused only after the copy out of it has completed."""

    def __init__(self, device: torch.device, chunk: int, ring: int, readers: int) -> None:
        pin = device.type == "cuda"
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(ring)]
        self.arrays = [b.numpy() for b in self.buffers]  # writable memoryviews for preadv
        self.done: list[Any] = [None] * ring  # per buffer, the event of the copy out of it
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="weightship-read")
        self.fds: dict[Path, int] = {}
        self.lock = threading.Lock()
        self.cuda = pin

    def fd(self, path: Path) -> int:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def read(self, slot: int, c: _Chunk) -> torch.Tensor:
        """Fill buffer ``slot`` with chunk ``c``, once the device has finished copying out of it."""
        event = self.done[slot]
        if event is not None:
            event.synchronize()
        view = self.arrays[slot].data[: c.nbytes]
        fd, got = self.fd(c.path), 0
        while got < c.nbytes:
            n = os.preadv(fd, [view[got:]], c.offset + got)
            if n <= 0:
                raise MalformedWeightsError(str(c.path), f"file ended while reading byte {c.offset + got}")
            got += n
        return self.buffers[slot][: c.nbytes]

    def close(self) -> None:
        self.pool.shutdown()
        for fd in self.fds.values():
            os.close(fd)


def load_staged(sources: dict[str, TensorSource], dtype: torch.dtype, device: torch.device, *,
                chunk: int = CHUNK_BYTES, ring: int = RING, readers: int = READERS) -> dict[str, torch.Tensor]:
    """The weights on ``device`` through a ring of pinned buffers (on a CPU device: plain
    buffers, copies synchronous: the same code, tested there)."""
    dest = _Destinations.allocate(sources, dtype, device, None)
    order = sorted(sources.values(), key=lambda s: (str(s.path), s.offset))
    # Each chunk's target: the destination's own bytes when nothing needs converting, else a
    # device scratch tensor of the stored dtype that is converted once the tensor is complete.
    work: list[tuple[TensorSource, _Chunk]] = [(s, c) for s in order for c in _chunks(s, chunk)]
    r = _Ring(device, chunk, ring, readers)
    pending: deque[Future[torch.Tensor]] = deque()
    try:
        for i in range(min(ring, len(work))):
            pending.append(r.pool.submit(r.read, i % ring, work[i][1]))
        scratch: torch.Tensor | None = None
        for i, (s, c) in enumerate(work):
            host = pending.popleft().result()
            dst = dest.views[s.name]
            direct = s.dtype == dtype and s.hf_heads is None
            if c.start == 0 and not direct:
                scratch = torch.empty(s.nbytes, dtype=torch.uint8, device=device)
            target = dst.view(-1).view(torch.uint8) if direct else scratch
            assert target is not None and target.numel() == s.nbytes, (s.name, s.nbytes)
            target[c.start : c.start + c.nbytes].copy_(host, non_blocking=True)
            if r.cuda:
                event = torch.cuda.Event()
                event.record()
                r.done[i % ring] = event
            if i + ring < len(work):
                pending.append(r.pool.submit(r.read, (i + ring) % ring, work[i + ring][1]))
            if not direct and c.start + c.nbytes == s.nbytes:
                assert scratch is not None
                _copy_into(dst, scratch.view(s.dtype).view(s.shape), s.hf_heads)
                scratch = None  # freed once the conversion queued behind it has run
        if r.cuda:
            torch.cuda.current_stream().synchronize()
    finally:
        for f in pending:
            f.cancel()
        r.close()
    return dest.views


def load_weights(weights: tuple[Path, ...], layout: str, arch: Architecture, dtype: torch.dtype,
                 device: torch.device, *, staged: bool | None = None) -> dict[str, torch.Tensor]:
    """Every tensor under its original-layout name on ``device`` in ``dtype``, ``wq``/``wk``/``wv``
    and ``w1``/``w3`` as row slices of one tensor each. ``staged``: through the pinned ring
    (default: on any device but the CPU)."""
    sources = plan_sources(weights, layout, arch)
    if staged if staged is not None else device.type != "cpu":
        return load_staged(sources, dtype, device)
    return load_mapped(sources, dtype)
