"""Many files in one fetch: one budget of requests in flight, and small files in one GET.

A fetch of a thousand small files is bound by requests, not bytes. So:

- **One budget** of requests in flight for the whole fetch (``max_connections ×
  parallel_files``, or ``connections × parallel_files`` where the connections do not grow,
  unless ``requests`` says otherwise), a semaphore every origin request of the fetch holds
  while it runs: a small file's GET holds one slot (small files take at most ``connections ×
  parallel_files`` of them), a large file's ranged reads up to its connections (one each).
  Large files start first, the largest first, so the tail is short.
- **A small file** (its size and digest known from the listing, at most one chunk) is one GET,
  no HEAD, sent by libcurl (:mod:`.curl`: half the CPU of urllib3 per request): read into
  memory, hashed, checked against the listing's digest before a byte is written, then written
  once. No thread pool, buffer set or resume journal per file: a small file is cheaper to
  fetch again than to resume.
- **Durable without a barrier per file**: small files are not fsynced one by one (on this VM's
  disk, 2,000 fsyncs of 2 KiB files took 4.7 s, one ``syncfs`` after writing them 0.6 s, and a
  directory fsync per rename another 3.2 s). Before anything is promoted, :func:`make_durable`
  flushes the staged files in one ``syncfs`` of their filesystem (else one fsync each); the
  renames then go without a directory fsync each, and :func:`sync_dirs` fsyncs each directory
  they touched once, before the manifest is written. A staged file that a crash left short or
  zeroed fails its hash on the next run and is fetched again.

Every lying-server check stays: the size the server reports and the size it sends must be the
planned one, the digest the trust anchor's, and the Hub's ``X-Repo-Commit`` the pinned commit
(:class:`~weightship.fetch.hf.HubRemote`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TypeVar

from weightship.errors import DiskFullError
from weightship.fetch.base import PlannedFile
from weightship.fetch.chunkfile import pwrite_all
from weightship.fetch.journal import journal_path
from weightship.fetch.options import TransferOptions
from weightship.fetch.remote import DownloadResult, RangeReader
from weightship.fetch.retry import with_retries
from weightship.paths import dir_beneath, open_beneath, unlink_beneath
from weightship.progress import Progress
from weightship.verify.digests import git_blob_hasher

log = logging.getLogger(__name__)
T = TypeVar("T")
_SYNCFS_FROM = 32  # staged files from which one syncfs beats an fsync each


def budget(opts: TransferOptions) -> int:
    """Requests in flight for a whole fetch: room for the large files' connections to grow
    (``max_connections``); small files take at most :func:`small_width` of it."""
    return opts.requests or max(opts.connections, opts.max_connections) * opts.parallel_files


def small_width(opts: TransferOptions) -> int:
    """Small files' GETs in flight at once."""
    return opts.requests or opts.connections * opts.parallel_files


def is_small(f: PlannedFile, opts: TransferOptions) -> bool:
    """Whether ``f`` is fetched in one GET: its size and a digest are known, and it fits a chunk."""
    return (opts.verify and f.size is not None and f.size <= opts.chunk_size
            and (f.sha256 is not None or f.git_sha1 is not None))


@contextlib.contextmanager
def holding(slots: threading.Semaphore | None) -> Iterator[None]:
    """One slot of the fetch's request budget, held for the block (none: no budget)."""
    if slots is None:
        yield
        return
    with slots:
        yield


def fetch_small(reader: RangeReader, f: PlannedFile, staging: Path, root: Path,
                opts: TransferOptions, progress: Progress,
                slots: threading.Semaphore | None = None) -> DownloadResult | None:
    """``f`` in one GET, checked, then written to ``staging`` (made durable with the others by
    :func:`make_durable`); None when ``reader`` cannot read a file whole without a HEAD first
    (the caller downloads it by ranges)."""
    assert f.size is not None
    size = f.size

    def read() -> memoryview | None:
        with holding(slots):
            return reader.read_all(size)

    data = with_retries(read, opts, f.path)
    if data is None:
        return None
    sha256, git = hashlib.sha256(data).hexdigest(), None
    if f.git_sha1 is not None:
        h = git_blob_hasher(size)
        h.update(data)
        git = h.hexdigest()
    f.check(len(data), sha256, git)
    _write_once(data, staging, root)
    progress.advance(f.path, len(data))
    return DownloadResult(size=len(data), sha256=sha256, git_sha1=git, fetched_bytes=len(data),
                          resumed_bytes=0)


def _write_once(data: memoryview, staging: Path, root: Path) -> None:
    try:  # one walk down to the staging directory for both (a small file's cost is syscalls)
        with dir_beneath(root, staging.parent.relative_to(root), create=True) as parent:
            with contextlib.suppress(FileNotFoundError):  # a partial by ranges from an earlier run is void
                os.unlink(journal_path(staging).name, dir_fd=parent)
            fd = open_beneath(parent, staging.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, data, 0, staging)  # made durable with the others (make_durable)
        finally:
            os.close(fd)
    except OSError as e:
        unlink_beneath(root, staging)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise DiskFullError(staging, e.strerror or str(e)) from None
        raise


def make_durable(root: Path, staged: list[Path]) -> None:
    """Every byte of the ``staged`` files on disk before any is promoted: for many files one
    ``syncfs`` of ``root``'s filesystem (Linux), else an fsync of each file (a syncfs also
    flushes whatever else is waiting on that filesystem: not worth it for a few files)."""
    if len(staged) >= _SYNCFS_FROM:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd):
                return
        finally:
            os.close(fd)
    for path in staged:
        fd = open_beneath(root, path.relative_to(root), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _syncfs(fd: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.syncfs(fd) == 0)
    except (OSError, AttributeError):
        return False


def sync_dirs(root: Path, paths: list[str]) -> None:
    """fsync once each directory that renames to ``paths`` (relative to ``root``) changed, and
    their parents (a directory made for them is an entry in its parent)."""
    dirs = {""}
    for p in paths:
        parts = PurePosixPath(p).parts[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for d in sorted(dirs, key=len, reverse=True):
        with dir_beneath(root, d or ".") as fd:
            os.fsync(fd)


def run_all(files: list[PlannedFile], one: Callable[[PlannedFile], T],
            opts: TransferOptions) -> tuple[list[T], list[BaseException]]:
    """``one(f)`` for every file: large files ``parallel_files`` at a time, the largest first,
    small files beside them on :func:`small_width` threads (each of their requests takes a slot of
    the budget). A failed file does not stop the others: (what the files gave, the
    failures), once all have ended."""
    order = sorted(files, key=lambda f: -(f.size or 0))
    large = [f for f in order if not is_small(f, opts)]
    small = [f for f in order if is_small(f, opts)]
    futures: list[Future[T]] = []
    with (ThreadPoolExecutor(max(1, min(opts.parallel_files, len(large))), thread_name_prefix="ws-file") as big,
          ThreadPoolExecutor(max(1, min(small_width(opts), len(small))), thread_name_prefix="ws-small") as little):
        futures += [big.submit(one, f) for f in large]
        futures += [little.submit(one, f) for f in small]
    results: list[T] = []
    errors: list[BaseException] = []
    for fut in futures:
        try:
            results.append(fut.result())
        except Exception as e:
            errors.append(e)
    return results, errors
