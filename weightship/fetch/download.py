"""Parallel, resumable download of one file by byte ranges, hashed while the bytes arrive.

The bytes come in chunks, in parallel, resumably (:mod:`weightship.fetch.chunked`). This module
runs that pass and what surrounds it: the first request (the size, checked against the trusted
one), the fall-backs (a server that ignores ``Range`` is read as one stream; a remote that changed
is started over once; chunks that peers sent wrong are fetched again from elsewhere), and the
final check of the digests, which deletes the partial on a mismatch.

The first request for a file (:meth:`RangeReader.stat`, an HTTP HEAD) is retried like every
other request. Transport failures are retried with exponential backoff and jitter when they are retryable
(:class:`~weightship.errors.TransientFetchError`: resets, timeouts, 5xx, short bodies, a lying
``Content-Range``), continuing the chunk from the last byte received; a stall (no bytes for
``stall_timeout`` seconds) is a timeout, so it reconnects the same way. Anything else fails the
file at once. A server that ignores ``Range`` is read as one stream from the first byte.

References: RFC 9110 §14 (range requests), §8.8.3 (ETag).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from weightship.errors import (
    DigestMismatchError,
    RangeNotSupportedError,
    RemoteChangedError,
    TransientFetchError,
)
from weightship.fetch.base import PlannedFile
from weightship.fetch.chunked import ChunkedDownload
from weightship.fetch.chunkfile import pwrite_all
from weightship.fetch.exchange import ChunkExchange
from weightship.fetch.journal import Journal, discard, journal_path
from weightship.fetch.options import TransferOptions
from weightship.fetch.remote import DownloadResult, RangeReader, RemoteStat
from weightship.fetch.retry import with_retries
from weightship.paths import open_beneath, unlink_beneath
from weightship.progress import NullProgress, Progress
from weightship.verify.digests import git_blob_hasher

log = logging.getLogger(__name__)



def _stream_whole(reader: RangeReader, staging: Path, remote: RemoteStat, opts: TransferOptions,
                  progress: Progress, path: str, git_sha1: bool, root: Path) -> DownloadResult:
    """Fetch a file from its first byte in one stream (a server that ignores ranges)."""
    discard(staging, root)
    sha = hashlib.sha256() if opts.verify else None
    git = git_blob_hasher(remote.size) if git_sha1 and opts.verify else None
    pos = 0
    buf = memoryview(bytearray(max(1, min(remote.size, opts.chunk_size))))
    fd = open_beneath(root, staging.relative_to(root), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644,
                      create_parents=True)
    try:
        for piece in reader.read_whole(buf):
            if pos + len(piece) > remote.size:
                raise TransientFetchError(f"{path}: server sent more than {remote.size} bytes")
            pwrite_all(fd, piece, pos, staging)
            for h in (sha, git):
                if h is not None:
                    h.update(piece)
            pos += len(piece)
            progress.advance(path, len(piece))
        if pos != remote.size:
            raise TransientFetchError(f"{path}: body ended at byte {pos}, expected {remote.size}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return DownloadResult(size=pos, sha256=sha.hexdigest() if sha else None,
                          git_sha1=git.hexdigest() if git else None, fetched_bytes=pos, resumed_bytes=0)


def download(reader: RangeReader, staging: Path, *, expected_size: int | None, sha256: str | None,
             git_sha1: str | None = None, opts: TransferOptions | None = None,
             progress: Progress | None = None, path: str = "", root: Path | None = None,
             exchange: ChunkExchange | None = None,
             slots: threading.Semaphore | None = None) -> DownloadResult:
    """Download ``reader``'s file into ``staging`` (resuming), hashing it on the way.

    Checks the remote's size against ``expected_size`` first, and the digests against ``sha256``
    / ``git_sha1`` last; on a digest mismatch the partial and its journal are deleted (which
    chunk was wrong cannot be known) and :class:`DigestMismatchError` is raised. On any other
    failure the partial and its journal stay, for the next try to resume. ``staging`` is opened
    without following a symlink below ``root`` (default: its own directory).

    With an ``exchange`` (peers; only for a file whose size and sha256 a trust anchor gave) the
    chunks go through it, the origin is asked for the file's size only when a chunk must come
    from it, and a digest mismatch first asks the exchange which chunks to fetch again.
    """
    opts = opts or TransferOptions()
    progress = progress or NullProgress()
    path = path or staging.name
    if root is None:
        staging.parent.mkdir(parents=True, exist_ok=True)
        root = staging.parent
    if exchange is not None and (sha256 is None or expected_size is None or not opts.verify):
        exchange = None
    if exchange is not None:
        assert expected_size is not None
        reader = _StatOnFirstRead(reader, opts, path, expected_size)
        remote = RemoteStat(size=expected_size, validator=None)  # the content is named by sha256
    else:
        remote = _stat_checked(reader, opts, path, expected_size)
    restarts = repairs = 0
    try:
        while True:
            job = ChunkedDownload(reader, staging, remote, sha256 or git_sha1, opts, progress, path,
                                   git_sha1 is not None, root, exchange, slots)
            try:
                result = job.run()
            except RangeNotSupportedError:
                log.info("%s: server ignores Range; fetching it whole", path)
                if exchange is not None:
                    exchange.end(False)
                    exchange = None
                result = _stream_whole(reader, staging, remote, opts, progress, path, git_sha1 is not None, root)
            except RemoteChangedError:
                restarts += 1
                if restarts > 1:
                    raise
                log.warning("%s: the remote file changed; starting over", path)
                discard(staging, root)
                remote = _stat_checked(reader, opts, path, expected_size)
                continue
            if exchange is not None and result.sha256 != sha256 and repairs < _MAX_REPAIRS:
                redo = exchange.suspects(job.from_origin)
                if redo is not None:  # peers were caught sending wrong chunks: fetch those again
                    repairs += 1
                    progress.note(f"{path}: digest mismatch; a peer sent wrong chunks and is banned; "
                                  f"fetching {len(redo)} chunks again from elsewhere")
                    _rewind(staging, redo)
                    continue
            break
        if opts.verify:
            _check(result, staging, root, path, sha256, git_sha1)
    except BaseException:
        if exchange is not None:
            exchange.end(False)
        raise
    unlink_beneath(root, journal_path(staging))
    if exchange is not None:
        exchange.end(True)
    return result


def _stat_checked(reader: RangeReader, opts: TransferOptions, path: str,
                  expected_size: int | None) -> RemoteStat:
    """The remote's size and validator (the first request, retried), held to the trusted size."""
    st = with_retries(reader.stat, opts, f"{path}: the first request")
    if expected_size is not None and st.size != expected_size:
        raise DigestMismatchError(path, expected=f"{expected_size} bytes",
                                  actual=f"{st.size} bytes (as the server reports it)", what="size")
    return st


_MAX_REPAIRS = 8  # each repair bans at least one peer; a swarm with more liars than this fails


def _rewind(staging: Path, chunks: set[int]) -> None:
    """Take ``chunks`` out of the partial's journal, so the next run fetches them again."""
    jpath = journal_path(staging)
    journal = Journal.load(jpath)
    assert journal is not None, jpath
    journal.done = [i for i in journal.done if i not in chunks]
    journal.save(jpath)


class _StatOnFirstRead(RangeReader):
    """A reader whose remote is asked for its size (and, for the Hub, its redirect followed) only
    before the first read: a fetch from peers alone never needs the origin to answer."""

    def __init__(self, inner: RangeReader, opts: TransferOptions, path: str, size: int) -> None:
        self.inner, self.opts, self.path, self.size = inner, opts, path, size
        self._lock = threading.Lock()
        self._stat: RemoteStat | None = None

    def stat(self) -> RemoteStat:
        with self._lock:
            if self._stat is None:
                self._stat = _stat_checked(self.inner, self.opts, self.path, self.size)
            return self._stat

    def read_range(self, start: int, end: int, validator: str | None, into: memoryview) -> Iterator[memoryview]:
        self.stat()
        return self.inner.read_range(start, end, validator, into)

    def read_whole(self, into: memoryview) -> Iterator[memoryview]:
        self.stat()
        return self.inner.read_whole(into)

    def close(self) -> None:
        self.inner.close()


def _check(result: DownloadResult, staging: Path, root: Path, path: str, sha256: str | None,
           git_sha1: str | None) -> None:
    try:
        PlannedFile(path, size=None, sha256=sha256, git_sha1=git_sha1).check(
            result.size, result.sha256, result.git_sha1)
    except DigestMismatchError:
        discard(staging, root)  # which chunk was wrong cannot be known: none of it is kept
        raise
