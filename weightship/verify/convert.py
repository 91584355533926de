"""Safe conversion of the original layout's pickled ``.pth`` weights to safetensors.

A pickle can run code when loaded, so a ``.pth`` is loaded only when:
1. the directory's manifest lists it (its digest was checked against a trust anchor when it was
   fetched, or the user vouched for it with a manifest) — and not when its only anchor was the
   unsigned manifest its own server sent (``unsigned-remote-manifest``) or the file listing of a
   Hub endpoint that is not the public Hub (``unsigned-hub-listing``), which are no anchors, and
2. its bytes still hash to that digest now;
and then only with ``torch.load(weights_only=True, mmap=True)``, whose unpickler refuses every
global except tensors and plain containers. The bytes hashed are the bytes loaded: the file is
opened once, without following a symlink below the directory, hashed from that descriptor, and
loaded through it (``/proc/self/fd/N``), so a file or link swapped in after the check (another
pod writing the same shared cache) is never what is unpickled. The result must be a flat dict of tensors whose
names and shapes match ``params.json``. It is written to staging, hashed, renamed into place,
and added to the manifest.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from weightship.catalog.architecture import Architecture
from weightship.errors import (
    DigestMismatchError,
    MalformedWeightsError,
    UntrustedFileError,
    UsageError,
)
from weightship.manifest import UNSIGNED_ANCHORS, UNSIGNED_LISTING, FileEntry, Manifest, utcnow
from weightship.paths import STATE_DIR, dir_beneath, open_beneath, replace_beneath, resolve_under
from weightship.verify import deep

CONVERTED_NAME = "consolidated.safetensors"


def _load_trusted_pth(path: str | BinaryIO, label: str) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=isinstance(path, str))
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError,
            TypeError, AttributeError, KeyError, ImportError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MalformedWeightsError(label, f"refused to load (weights_only): {first}") from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise MalformedWeightsError(label, "not a flat dict of tensors")
    return obj


def _sha256_of(f: BinaryIO) -> tuple[int, str]:
    """(size, hex sha256) of an open file, read from its start."""
    f.seek(0)
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(4 << 20):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def _fd_path(fd: int) -> str | None:
    """A path that opens the file behind ``fd`` itself, not whatever its name points to now
    (Linux's ``/proc/self/fd``); None where there is none."""
    path = f"/proc/self/fd/{fd}"
    return path if os.path.exists(path) else None


def convert_directory(directory: Path, *, manifest: Manifest | None = None) -> FileEntry:
    """Convert ``directory``'s ``consolidated*.pth`` to ``consolidated.safetensors``.

    Returns the new file's manifest entry; the directory's manifest is updated.
    """
    from safetensors.torch import save_file

    own = Manifest.load(directory)
    trust = manifest or own
    pth = sorted(f.path for f in own.files if f.path.startswith("consolidated") and f.path.endswith(".pth"))
    if not pth:
        raise UsageError(f"{directory} has no consolidated*.pth listed in its manifest",
                         hint="convert works on the original layout (params.json + consolidated.00.pth)")
    if len(pth) > 1:
        raise UsageError(f"{directory}: sharded original checkpoints ({', '.join(pth)}) are not supported")
    rel = pth[0]
    entry = trust.entry(rel)
    if entry is None:
        raise UntrustedFileError(f"{rel} is not listed in the trusted manifest; refusing to unpickle it")
    if manifest is None and entry.anchor in UNSIGNED_ANCHORS:
        what = ("the file listing of a Hub endpoint that is not the public Hub"
                if entry.anchor == UNSIGNED_LISTING else "the unsigned manifest its server sent")
        raise UntrustedFileError(
            f"{rel}: its only trust anchor is {what} ({entry.anchor}); refusing to unpickle it",
            hint="pass --manifest FILE that you trust, or fetch it again with --trust-key PUB "
                 "from a signed manifest")
    resolve_under(directory, rel)  # a name the sanitizer accepts
    with os.fdopen(open_beneath(directory, rel, os.O_RDONLY), "rb") as pickled:
        size, sha = _sha256_of(pickled)
        if size != entry.size or sha != entry.sha256:
            raise DigestMismatchError(rel, expected=entry.sha256, actual=sha)
        found = deep.directory_architecture(directory)
        if found is None or found[1] != "original":
            raise UsageError(f"{directory} has no params.json; cannot check the converted tensors")
        arch: Architecture = found[0]
        tensors = _load_trusted_pth(_fd_path(pickled.fileno()) or pickled, rel)
    expected = arch.tensor_shapes("original")
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise MalformedWeightsError(rel, f"tensors do not match params.json (missing {missing[:3]}, "
                                         f"unexpected {extra[:3]})")
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name]:
            raise MalformedWeightsError(rel, f"{name} has shape {list(t.shape)}, params.json says "
                                             f"{list(expected[name])}")

    incoming, name = f"{STATE_DIR}/incoming", f"{CONVERTED_NAME}.incomplete"
    staging = directory / incoming / name
    try:
        # safetensors writes a temporary file beside its target and renames it: give it the
        # staging directory as reached without following a link
        with dir_beneath(directory, incoming, create=True) as staging_dir:
            where = _fd_path(staging_dir)
            save_file({k: v.contiguous() for k, v in sorted(tensors.items())},
                      f"{where}/{name}" if where else str(staging),
                      metadata={"format": "pt", "converted_from": rel, "converted_from_sha256": sha})
        with os.fdopen(open_beneath(directory, f"{incoming}/{name}", os.O_RDONLY), "rb") as out:
            os.fsync(out.fileno())
            out_size, out_sha = _sha256_of(out)
            replace_beneath(directory, f"{incoming}/{name}", CONVERTED_NAME, same_as=out.fileno())
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    new = FileEntry(path=CONVERTED_NAME, size=out_size, sha256=out_sha,
                    source=f"convert:{rel}", anchor="convert")
    own.upsert(new)
    own.verified_at = utcnow()
    own.write(directory)
    return new
