"""Parallel, resumable download of one file by byte ranges, hashed while the bytes arrive.

The file is cut into chunks of ``chunk_size`` bytes. ``connections`` workers each fetch one chunk
at a time with a ranged read straight into a chunk buffer, and hand the full buffer to the file's
writer thread (so the network does not wait for the disk), which writes it at its offset in
``PATH.incomplete`` with one ``O_DIRECT`` ``pwrite``: the disk reads it from the buffer, so there
is no copy into the page cache and nothing left to write back when the file is fsynced before
promotion. Where the filesystem refuses ``O_DIRECT`` (or ``direct_io`` is off) chunks are
written through the page cache, and the kernel is asked to start writing each one back at once.
The sha256 (and, for the Hub's small files, the git blob sha1) is computed over the *contiguous
prefix*: a finished chunk stays in its buffer until every chunk before it is hashed, so no byte
is read twice. There are ``connections + 2`` page-aligned buffers, reused (a slow first chunk
holds the others back rather than letting memory grow: ``(connections + 2) × chunk_size`` per
file at most).

The resume journal, ``PATH.incomplete.journal``, lists the finished chunks and what they were
fetched against (size, chunk size, the remote's validator, the expected digest). It is replaced
atomically after every chunk written, so after ``kill -9`` a rerun re-reads the finished chunks
from disk (to rebuild the hash) and downloads only the rest: the bytes fetched twice are bounded
by the chunks that were in flight or waiting for the writer, ``(connections + 2) × chunk_size``
per file (one per buffer). A journal that does not match the remote any more (another ETag,
another size) throws the partial away.

The first request for a file (:meth:`RangeReader.stat`, an HTTP HEAD) is retried like every
other request. Transport failures are retried with exponential backoff and jitter when they are retryable
(:class:`~weightship.errors.TransientFetchError`: resets, timeouts, 5xx, short bodies, a lying
``Content-Range``), continuing the chunk from the last byte received; a stall (no bytes for
``stall_timeout`` seconds) is a timeout, so it reconnects the same way. Anything else fails the
file at once. A server that ignores ``Range`` is read as one stream from the first byte.

References: RFC 9110 §14 (range requests), §8.8.3 (ETag); aria2's segmented download.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from weightship.errors import (
    DigestMismatchError,
    RangeNotSupportedError,
    RemoteChangedError,
    TransientFetchError,
)
from weightship.fetch.chunkfile import DIRECT_ALIGN, Buffers, ChunkFile, pwrite_all
from weightship.fetch.exchange import ChunkExchange, Stopped
from weightship.fetch.journal import Journal, discard, journal_path
from weightship.fetch.options import TransferOptions
from weightship.fetch.prefixhash import PrefixHasher
from weightship.fetch.retry import with_retries
from weightship.paths import open_beneath
from weightship.progress import NullProgress, Progress
from weightship.verify.digests import git_blob_hasher

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RemoteStat:
    """What a remote says about a file before we read it."""

    size: int
    validator: str | None  # a strong ETag (or equivalent) that changes when the bytes change


class RangeReader(ABC):
    """One remote file that can be read by byte ranges (HTTP, S3, …)."""

    @abstractmethod
    def stat(self) -> RemoteStat:
        """The file's size and validator."""

    @abstractmethod
    def read_range(self, start: int, end: int, validator: str | None, into: memoryview) -> Iterator[memoryview]:
        """Read exactly bytes ``[start, end)`` into ``into`` (``end - start`` long), yielding the
        view of ``into`` that each read filled, in order; or raise.

        Raises :class:`RangeNotSupportedError` when the remote ignores ranges,
        :class:`RemoteChangedError` when its validator is no longer ``validator``, and
        :class:`TransientFetchError` for whatever a retry may fix (the caller continues from
        the bytes it got).
        """

    def read_all(self, size: int) -> memoryview | None:
        """The whole file in one request, without asking for its size first (a listing gave it,
        ``size``); None where this remote reads only after :meth:`stat`."""
        return None

    def read_whole(self, into: memoryview) -> Iterator[memoryview]:
        """The whole file from its first byte (for remotes that ignore ranges), through ``into``
        reused from its start: each view yielded must be used before the next is asked for."""
        raise RangeNotSupportedError("this remote ignores ranged reads and cannot stream whole")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the reader holds."""


@dataclass
class DownloadResult:
    """What :func:`download` produced."""

    size: int
    sha256: str | None
    git_sha1: str | None
    fetched_bytes: int  # bytes that came over the network in this call
    resumed_bytes: int  # bytes already on disk from an earlier try


class _ChunkedDownload:
    """State of one file's parallel download; see the module docstring."""

    def __init__(self, reader: RangeReader, staging: Path, remote: RemoteStat, digest: str | None,
                 opts: TransferOptions, progress: Progress, path: str, git_sha1: bool,
                 root: Path, exchange: ChunkExchange | None = None,
                 slots: threading.Semaphore | None = None) -> None:
        self.reader, self.staging, self.remote, self.opts = reader, staging, remote, opts
        self.slots = slots  # the fetch's request budget: each origin read holds a slot
        self.root, self.exchange = root, exchange
        self.progress, self.path = progress, path
        self.chunk = opts.chunk_size  # a resumed download keeps the chunk size it started with
        self.chunks = max(1, math.ceil(remote.size / self.chunk))
        self.journal = Journal(size=remote.size, chunk_size=opts.chunk_size,
                               validator=remote.validator, digest=digest)
        self.jpath = journal_path(staging)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.fetched = 0
        self.resumed = 0
        self.git_sha1 = git_sha1

    def _resume_state(self) -> set[int]:
        old = Journal.load(self.jpath)
        if old is None or not old.matches(self.journal) or not self.staging.exists():
            if old is not None:
                log.info("%s: partial download is stale (remote or plan changed), starting over",
                         self.path)
            discard(self.staging)
            return set()
        self.chunk = self.journal.chunk_size = old.chunk_size
        self.chunks = max(1, math.ceil(self.remote.size / self.chunk))
        on_disk = self.staging.stat().st_size
        done = {i for i in old.done if 0 <= i < self.chunks
                and min((i + 1) * self.chunk, self.remote.size) <= on_disk}
        self.resumed = sum(self._chunk_len(i) for i in done)
        return done

    def _chunk_len(self, i: int) -> int:
        return min((i + 1) * self.chunk, self.remote.size) - i * self.chunk

    def run(self) -> DownloadResult:
        done = self._resume_state()
        self.buffers = Buffers(self.opts.connections + 2, min(self.chunk, max(1, self.remote.size)))
        out = ChunkFile(self.staging, self.root,
                         direct=self.opts.direct_io and self.chunk % DIRECT_ALIGN == 0)
        if self.exchange is not None:
            try:  # chunks whose bytes the exchange cannot vouch for are fetched again
                done -= self.exchange.begin(out.fd, self.remote.size, self.chunk, done, self.stop,
                                            self.from_origin)
            except BaseException:
                out.close()
                raise
            self.resumed = sum(self._chunk_len(i) for i in done)
        hasher = PrefixHasher(out.fd, self.remote.size, self.chunk, git_sha1=self.git_sha1,
                               enabled=self.opts.verify, on_hashed=self._hashed)
        try:
            if self.resumed:
                self.progress.advance(self.path, self.resumed)
                self.progress.note(f"{self.path}: resuming, {self.resumed:,} bytes already on disk")
            for i in sorted(done):
                hasher.offer(i, None)
            self.journal.done = sorted(done)
            todo = iter([i for i in range(self.chunks) if i not in done])
            if self.remote.size > 0:
                self._run_workers(out, todo, done, hasher)
            os.fsync(out.fd)
        finally:
            try:
                hasher.close()
            finally:
                out.close()
        assert hasher.next == self.chunks or self.remote.size == 0, (hasher.next, self.chunks)
        return DownloadResult(
            size=self.remote.size,
            sha256=hasher.sha256.hexdigest() if hasher.sha256 is not None else None,
            git_sha1=hasher.git.hexdigest() if hasher.git is not None else None,
            fetched_bytes=self.fetched, resumed_bytes=self.resumed)

    def _hashed(self, index: int, data: memoryview | None) -> None:
        if data is not None:  # a chunk fetched by this run gives its buffer back
            self.buffers.give(data.obj)  # type: ignore[arg-type]

    def _run_workers(self, out: ChunkFile, todo: Iterator[int], done: set[int], hasher: PrefixHasher) -> None:
        errors: list[BaseException] = []
        todo_lock = threading.Lock()

        def take_buffer() -> mmap.mmap | None:
            while (buf := self.buffers.take(timeout=0.2)) is None:
                if self.stop.is_set() or hasher.error is not None:
                    return None
            return buf

        def fail(e: BaseException) -> None:
            with self.lock:
                errors.append(e)
            self.stop.set()

        def write(index: int, data: memoryview) -> None:
            try:
                out.write(data, index * self.chunk)
                if self.exchange is not None:
                    self.exchange.written(index)
            except BaseException as e:
                self.buffers.give(data.obj)  # type: ignore[arg-type]
                fail(e)
                return
            with self.lock:
                done.add(index)
                self.journal.done = sorted(done)
                self.journal.save(self.jpath)
            hasher.offer(index, data)

        def worker() -> None:
            while not self.stop.is_set() and (buf := take_buffer()) is not None:
                with todo_lock:
                    index = next(todo, None)
                if index is None:
                    self.buffers.give(buf)
                    return
                try:
                    data = self._fetch_chunk(index, memoryview(buf)[:self._chunk_len(index)])
                except BaseException as e:
                    self.buffers.give(buf)
                    fail(e)
                    return
                writer.submit(write, index, data)  # and on to the next chunk meanwhile

        n = min(self.opts.connections, self.chunks)
        # One writer thread: chunks reach the disk in the order they arrived, while the workers
        # go on reading (leaving the block waits for every write handed to it).
        with (ThreadPoolExecutor(1, thread_name_prefix="ws-write") as writer,
              ThreadPoolExecutor(n, thread_name_prefix="ws-chunk") as pool):
            for f in [pool.submit(worker) for _ in range(n)]:
                f.result()
        if errors:
            raise _most_telling(errors)

    def _fetch_chunk(self, index: int, into: memoryview) -> memoryview:
        """Chunk ``index`` into ``into``; ``into`` when it is complete."""
        if self.exchange is not None:
            return self.exchange.fetch(index, into, self.from_origin, self._count)
        return self.from_origin(index, into)

    def _count(self, n: int) -> None:
        with self.lock:
            self.fetched += n
        self.progress.advance(self.path, n)

    def from_origin(self, index: int, into: memoryview) -> memoryview:
        """Chunk ``index`` into ``into`` from the reader, retried; ``into`` when it is complete."""
        start = index * self.chunk
        end = start + len(into)
        pos, failures = start, 0
        while pos < end:
            if self.stop.is_set():
                raise Stopped()
            try:
                if self.slots is not None:
                    self.slots.acquire()
                try:
                    for view in self.reader.read_range(pos, end, self.remote.validator, into[pos - start:]):
                        pos += len(view)
                        with self.lock:
                            self.fetched += len(view)
                        self.progress.advance(self.path, len(view))
                        failures = 0
                        if self.stop.is_set():
                            raise Stopped()
                finally:
                    if self.slots is not None:
                        self.slots.release()
                if pos < end:
                    raise TransientFetchError(f"{self.path}: body ended at byte {pos}, expected {end}")
            except TransientFetchError as e:
                failures += 1
                if failures > self.opts.retries:
                    raise
                delay = min(self.opts.backoff_max, self.opts.backoff * 2 ** (failures - 1))
                delay *= 0.5 + random.random() / 2
                log.info("%s: %s; retry %d in %.1fs from byte %d", self.path, e, failures, delay, pos)
                if self.stop.wait(delay):
                    raise Stopped() from None
        return into


def _most_telling(errors: list[BaseException]) -> BaseException:
    real = [e for e in errors if not isinstance(e, Stopped)]
    return (real or errors)[0]


def _stream_whole(reader: RangeReader, staging: Path, remote: RemoteStat, opts: TransferOptions,
                  progress: Progress, path: str, git_sha1: bool, root: Path) -> DownloadResult:
    """Fetch a file from its first byte in one stream (a server that ignores ranges)."""
    discard(staging)
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
        remote = with_retries(reader.stat, opts, f"{path}: the first request")
    if expected_size is not None and remote.size != expected_size:
        raise DigestMismatchError(path, expected=f"{expected_size} bytes",
                                  actual=f"{remote.size} bytes (as the server reports it)", what="size")
    restarts = repairs = 0
    try:
        while True:
            job = _ChunkedDownload(reader, staging, remote, sha256 or git_sha1, opts, progress, path,
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
                discard(staging)
                remote = with_retries(reader.stat, opts, f"{path}: the first request")
                if expected_size is not None and remote.size != expected_size:
                    raise DigestMismatchError(path, expected=f"{expected_size} bytes",
                                              actual=f"{remote.size} bytes", what="size") from None
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
            _check(result, staging, path, sha256, git_sha1)
    except BaseException:
        if exchange is not None:
            exchange.end(False)
        raise
    journal_path(staging).unlink(missing_ok=True)
    if exchange is not None:
        exchange.end(True)
    return result


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
                st = with_retries(self.inner.stat, self.opts, f"{self.path}: the first request")
                if st.size != self.size:
                    raise DigestMismatchError(self.path, expected=f"{self.size} bytes",
                                              actual=f"{st.size} bytes (as the server reports it)",
                                              what="size")
                self._stat = st
            return self._stat

    def read_range(self, start: int, end: int, validator: str | None, into: memoryview) -> Iterator[memoryview]:
        self.stat()
        return self.inner.read_range(start, end, validator, into)

    def read_whole(self, into: memoryview) -> Iterator[memoryview]:
        self.stat()
        return self.inner.read_whole(into)

    def close(self) -> None:
        self.inner.close()


def _check(result: DownloadResult, staging: Path, path: str, sha256: str | None,
           git_sha1: str | None) -> None:
    problem: DigestMismatchError | None = None
    if sha256 is not None and result.sha256 != sha256:
        problem = DigestMismatchError(path, expected=sha256, actual=str(result.sha256))
    elif git_sha1 is not None and result.git_sha1 != git_sha1:
        problem = DigestMismatchError(path, expected=git_sha1, actual=str(result.git_sha1),
                                      what="git blob sha1")
    if problem is not None:
        discard(staging)
        raise problem
