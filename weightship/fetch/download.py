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

import errno
import hashlib
import logging
import math
import mmap
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightship.errors import (
    DigestMismatchError,
    DiskFullError,
    RangeNotSupportedError,
    RemoteChangedError,
    TransientFetchError,
    UnsafePathError,
)
from weightship.fetch.journal import Journal, discard, journal_path
from weightship.fetch.prefixhash import PrefixHasher
from weightship.paths import open_beneath
from weightship.progress import NullProgress, Progress
from weightship.verify.digests import git_blob_hasher

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TransferOptions:
    """How hard to pull. The defaults keep 8 ranged reads in flight in 192 MiB of buffers:
    enough for a 2-core laptop and for a link a few connections fill (on loopback here, 1 GiB/s).
    On a fast link to a far server, where each connection is held back by latency, raise
    ``connections``: each one costs a thread and ``chunk_size`` bytes per file."""

    connections: int = 4  # ranged reads in flight per file; more hides per-connection latency
    parallel_files: int = 2  # files downloaded at once; total connections = product of both
    chunk_size: int = 16 << 20  # bytes per ranged read; also the resume granularity
    stall_timeout: float = 30.0  # seconds without a byte before reconnecting
    retries: int = 6  # tries per chunk without progress, for retryable errors only
    backoff: float = 0.5  # first retry delay in seconds, doubled each time (with jitter)
    backoff_max: float = 15.0
    verify: bool = True  # hash while downloading; off only for benchmarks (never promoted)
    # Write chunks with O_DIRECT where the filesystem allows: no page-cache copy (on a 2-core VM
    # here, 1 GiB fetched and fsynced took 1.25 s instead of 1.9 s), and a fresh model does not
    # push other files out of the cache. The price: it is not in the cache afterwards either.
    direct_io: bool = True

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TransferOptions:
        """Options from a request's ``options`` mapping (keys as the field names)."""
        known = {k: options[k] for k in cls.__dataclass_fields__ if options.get(k) is not None}
        opts = cls(**known)
        assert opts.connections >= 1 and opts.parallel_files >= 1 and opts.chunk_size >= 4096, opts
        return opts


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
                 root: Path) -> None:
        self.reader, self.staging, self.remote, self.opts = reader, staging, remote, opts
        self.root = root
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
        self.buffers = _Buffers(self.opts.connections + 2, min(self.chunk, max(1, self.remote.size)))
        out = _ChunkFile(self.staging, self.root,
                         direct=self.opts.direct_io and self.chunk % _DIRECT_ALIGN == 0)
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

    def _run_workers(self, out: _ChunkFile, todo: Iterator[int], done: set[int], hasher: PrefixHasher) -> None:
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
        start = index * self.chunk
        end = start + len(into)
        pos, failures = start, 0
        while pos < end:
            if self.stop.is_set():
                raise _Stopped()
            try:
                for view in self.reader.read_range(pos, end, self.remote.validator, into[pos - start:]):
                    pos += len(view)
                    with self.lock:
                        self.fetched += len(view)
                    self.progress.advance(self.path, len(view))
                    failures = 0
                    if self.stop.is_set():
                        raise _Stopped()
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
                    raise _Stopped() from None
        return into


_DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of the block size
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only


class _ChunkFile:
    """The partial file, written a chunk at a time: by ``O_DIRECT`` where the filesystem allows
    it, else (and for a file's unaligned tail) through the page cache. ``fd`` reads and fsyncs.

    Opened without following a symlink below ``root`` (:func:`weightship.paths.open_beneath`); the
    second, ``O_DIRECT`` descriptor must be of the same file."""

    def __init__(self, path: Path, root: Path, *, direct: bool) -> None:
        self.path = path
        rel = path.relative_to(root)
        self.fd = open_beneath(root, rel, os.O_RDWR | os.O_CREAT, 0o644, create_parents=True)
        self._direct: int | None = None
        flag = getattr(os, "O_DIRECT", 0)  # Linux and the BSDs; not macOS or Windows
        if direct and flag:
            try:
                self._direct = open_beneath(root, rel, os.O_WRONLY | flag)
            except OSError as e:  # EINVAL: tmpfs before Linux 6.6, some FUSE filesystems
                if isinstance(e, UnsafePathError):
                    os.close(self.fd)
                    raise
                log.debug("%s: no O_DIRECT here (%s); writing through the page cache", path, e)
            if self._direct is not None and not _same_file(self.fd, self._direct):
                self.close()
                raise UnsafePathError(str(rel), "was replaced while it was being opened")
        self._use_direct = self._direct is not None

    def write(self, data: memoryview, offset: int) -> None:
        """Write ``data`` (a chunk buffer's start, so page-aligned) at ``offset``."""
        aligned = len(data) - len(data) % _DIRECT_ALIGN
        if self._use_direct and aligned and offset % _DIRECT_ALIGN == 0:
            try:
                _pwrite_all(self._direct, data[:aligned], offset, self.path)  # type: ignore[arg-type]
                data, offset = data[aligned:], offset + aligned
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # The device wants a larger alignment: the rest of the file goes through the cache.
                log.debug("%s: O_DIRECT write refused (%s); writing through the page cache", self.path, e)
                self._use_direct = False
        if data:
            _pwrite_all(self.fd, data, offset, self.path)
            _start_writeback(self.fd, offset, len(data))

    def close(self) -> None:
        os.close(self.fd)
        if self._direct is not None:
            os.close(self._direct)


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class _Buffers:
    """Up to ``count`` chunk buffers of ``size`` bytes, made when first needed and then reused
    (memory stays flat, and no page is faulted in twice). Anonymous maps: page-aligned, as
    ``O_DIRECT`` needs."""

    def __init__(self, count: int, size: int) -> None:
        self._free: list[mmap.mmap] = []
        self._left, self._size = count, size
        self._cond = threading.Condition()

    def take(self, timeout: float) -> mmap.mmap | None:
        """A buffer, or None when none came free within ``timeout`` seconds."""
        with self._cond:
            if not self._free and self._left == 0:
                self._cond.wait(timeout)
            if self._free:
                return self._free.pop()
            if self._left == 0:
                return None
            self._left -= 1
        # Faulted in whole at once (every byte of it will be written): cheaper than page by page.
        return mmap.mmap(-1, self._size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)

    def give(self, buf: mmap.mmap) -> None:
        """Return a buffer for another chunk."""
        with self._cond:
            self._free.append(buf)
            self._cond.notify()


def _writeback_starter() -> Callable[[int, int, int], object]:
    """Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, a no-op elsewhere: starts writing a
    finished chunk to the disk without waiting, so the disk works while the network does and
    the final ``fsync`` waits only for the last chunks (on 1 GiB, about 0.3 s saved here)."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: fn(fd, offset, length, 2)  # 2: SYNC_FILE_RANGE_WRITE


_start_writeback = _writeback_starter()


class _Stopped(Exception):
    """Another worker failed; this one stops without adding an error of its own."""


def _most_telling(errors: list[BaseException]) -> BaseException:
    real = [e for e in errors if not isinstance(e, _Stopped)]
    return (real or errors)[0]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise DiskFullError(path, e.strerror or str(e)) from None
            raise
        view, offset = view[n:], offset + n


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
            _pwrite_all(fd, piece, pos, staging)
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
             progress: Progress | None = None, path: str = "", root: Path | None = None) -> DownloadResult:
    """Download ``reader``'s file into ``staging`` (resuming), hashing it on the way.

    Checks the remote's size against ``expected_size`` first, and the digests against ``sha256``
    / ``git_sha1`` last; on a digest mismatch the partial and its journal are deleted (which
    chunk was wrong cannot be known) and :class:`DigestMismatchError` is raised. On any other
    failure the partial and its journal stay, for the next try to resume. ``staging`` is opened
    without following a symlink below ``root`` (default: its own directory).
    """
    opts = opts or TransferOptions()
    progress = progress or NullProgress()
    path = path or staging.name
    if root is None:
        staging.parent.mkdir(parents=True, exist_ok=True)
        root = staging.parent
    remote = stat_with_retries(reader, opts, path)
    if expected_size is not None and remote.size != expected_size:
        raise DigestMismatchError(path, expected=f"{expected_size} bytes",
                                  actual=f"{remote.size} bytes (as the server reports it)", what="size")
    restarts = 0
    while True:
        job = _ChunkedDownload(reader, staging, remote, sha256 or git_sha1, opts, progress, path,
                               git_sha1 is not None, root)
        try:
            result = job.run()
            break
        except RangeNotSupportedError:
            log.info("%s: server ignores Range; fetching it whole", path)
            result = _stream_whole(reader, staging, remote, opts, progress, path, git_sha1 is not None, root)
            break
        except RemoteChangedError:
            restarts += 1
            if restarts > 1:
                raise
            log.warning("%s: the remote file changed; starting over", path)
            discard(staging)
            remote = stat_with_retries(reader, opts, path)
            if expected_size is not None and remote.size != expected_size:
                raise DigestMismatchError(path, expected=f"{expected_size} bytes",
                                          actual=f"{remote.size} bytes", what="size") from None
    if opts.verify:
        _check(result, staging, path, sha256, git_sha1)
    journal_path(staging).unlink(missing_ok=True)
    return result


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


def stat_with_retries(reader: RangeReader, opts: TransferOptions, path: str) -> RemoteStat:
    """``reader.stat()``, retried with backoff while it fails in a way a retry may fix (a 503,
    a reset), as a chunk's reads are."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return reader.stat()
        except TransientFetchError as e:
            if attempt > opts.retries:
                raise
            log.info("%s: %s; retry %d of the first request", path, e, attempt)
            sleep_backoff(attempt, opts)


def sleep_backoff(attempt: int, opts: TransferOptions) -> None:
    """Sleep before retry ``attempt`` (1-based) of a whole request (not a chunk)."""
    delay = min(opts.backoff_max, opts.backoff * 2 ** (attempt - 1))
    time.sleep(delay * (0.5 + random.random() / 2))

