"""SHA-256 of files, several at once.

hashlib releases the GIL while it hashes a buffer, and so does reading a file, so a thread per
core hashes that many files in parallel (about 1.5 GB/s per core with SHA-NI).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from weightship.progress import NullProgress, Progress
from weightship.settings import get_settings


def git_blob_hasher(size: int) -> hashlib._Hash:
    """A sha1 primed with git's blob header: fed the file's ``size`` bytes, it gives the blob id
    the Hugging Face Hub reports for files it stores in plain git."""
    return hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)


def _read_into(path: Path, hashers: list[hashlib._Hash], label: str, progress: Progress,
               chunk: int | None) -> int:
    size = 0
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        # about the file's size (a byte more sees its end; at least 64 KiB, for a file whose size
        # says nothing): a buffer of 4 MiB made for each of a thousand 2 KiB files cost more
        # than hashing them
        buf = bytearray(min(chunk or get_settings().read_chunk, max(os.fstat(f.fileno()).st_size + 1, 64 << 10)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            for h in hashers:
                h.update(view[:n])
            size += n
            progress.advance(label, n)
    return size


def sha256_file(path: Path, *, label: str | None = None, progress: Progress | None = None,
                chunk: int | None = None) -> tuple[int, str]:
    """(size, hex sha256) of the file at ``path``, read once, sequentially."""
    digest = hashlib.sha256()
    size = _read_into(path, [digest], label or str(path), progress or NullProgress(), chunk)
    return size, digest.hexdigest()


def sha256_and_git_blob(path: Path) -> tuple[int, str, str]:
    """(size, hex sha256, hex git blob sha1) of the file at ``path``, read once."""
    size = path.stat().st_size
    sha, git = hashlib.sha256(), git_blob_hasher(size)
    read = _read_into(path, [sha, git], str(path), NullProgress(), None)
    if read != size:
        raise OSError(f"{path} changed size while being hashed")
    return size, sha.hexdigest(), git.hexdigest()


def hash_files(files: Iterable[tuple[str, Path]], *, workers: int | None = None,
               progress: Progress | None = None) -> dict[str, tuple[int, str] | OSError]:
    """Hash every (label, path) pair; a file that cannot be read maps to its ``OSError``.

    Larger files are started first so that the last worker is not left with the biggest file.
    """
    progress = progress or NullProgress()
    items = list(files)

    def size_of(item: tuple[str, Path]) -> int:
        try:
            return item[1].stat().st_size
        except OSError:
            return 0

    items.sort(key=size_of, reverse=True)

    def one(item: tuple[str, Path]) -> tuple[str, tuple[int, str] | OSError]:
        label, path = item
        progress.file_begin(label, size_of(item))
        try:
            result: tuple[int, str] | OSError = sha256_file(path, label=label, progress=progress)
        except OSError as e:
            result = e
        progress.file_end(label, "read" if not isinstance(result, OSError) else "unreadable")
        return label, result

    n = max(1, min(workers or get_settings().hash_workers, len(items) or 1))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sha256") as pool:
        return dict(pool.map(one, items))
