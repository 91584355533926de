"""One pass of the parallel, resumable download of a file by byte ranges (see
:func:`weightship.fetch.download.download`, which runs it and checks the result).

The file is cut into chunks of ``chunk_size`` bytes (a file of fewer chunks than connections
into one per connection: :meth:`~weightship.fetch.options.TransferOptions.chunk_for`).
``connections`` workers each fetch one chunk at a time with a ranged read straight into a chunk
buffer, and hand the full buffer to the file's writer thread (so the network does not wait for
the disk), which writes it at its offset in ``PATH.incomplete`` with one ``O_DIRECT``
``pwrite``: the disk reads it from the buffer, so there is no copy into the page cache and
nothing left to write back when the file is fsynced before promotion. Where the filesystem
refuses ``O_DIRECT`` (or ``direct_io`` is off) chunks are written through the page cache, and the
kernel is asked to start writing each one back at once.
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

References: RFC 9110 §14 (range requests); aria2's segmented download.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from weightship.errors import (
    TransientFetchError,
)
from weightship.fetch.chunkfile import DIRECT_ALIGN, Buffers, ChunkFile
from weightship.fetch.exchange import ChunkExchange, Stopped
from weightship.fetch.journal import Journal, discard, journal_path
from weightship.fetch.options import TransferOptions
from weightship.fetch.prefixhash import PrefixHasher
from weightship.fetch.remote import DownloadResult, RangeReader, RemoteStat
from weightship.progress import Progress

log = logging.getLogger(__name__)
PROBE = 0.5  # seconds over which a download's rate is taken before and after its connections double
GROWTH = 0.25  # the rise in rate a doubling must bring for the connections to double again
WORTH = 2.0  # seconds of the file left, at the rate so far, for more connections to be tried



class ChunkedDownload:
    """State of one file's parallel download; see the module docstring."""

    def __init__(self, reader: RangeReader, staging: Path, remote: RemoteStat, digest: str | None,
                 opts: TransferOptions, progress: Progress, path: str, git_sha1: bool,
                 root: Path, exchange: ChunkExchange | None = None,
                 slots: threading.Semaphore | None = None) -> None:
        self.reader, self.staging, self.remote, self.opts = reader, staging, remote, opts
        self.slots = slots  # the fetch's request budget: each origin read holds a slot
        self.root, self.exchange = root, exchange
        self.progress, self.path = progress, path
        # a file shared with peers is cut as they cut it; a resumed download keeps its chunk size
        self.chunk = opts.chunk_size if exchange is not None else opts.chunk_for(remote.size)
        self.chunks = max(1, math.ceil(remote.size / self.chunk))
        self.journal = Journal(size=remote.size, chunk_size=self.chunk,
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
            discard(self.staging, self.root)
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
        self.buffers = Buffers(min(self.opts.connections, self.chunks) + 2, min(self.chunk, max(1, self.remote.size)))
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
                self._store(out, index, data)
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

        n, most = min(self.opts.connections, self.chunks), self._most_workers()
        # One writer thread: chunks reach the disk in the order they arrived, while the workers
        # go on reading (leaving the block waits for every write handed to it).
        with (ThreadPoolExecutor(1, thread_name_prefix="ws-write") as writer,
              ThreadPoolExecutor(most, thread_name_prefix="ws-chunk") as pool):
            workers = [pool.submit(worker) for _ in range(n)]
            if most > n:
                self._grow(workers, lambda: pool.submit(worker), most)
            for f in workers:
                f.result()
        if errors:
            raise _most_telling(errors)

    def _store(self, out: ChunkFile, index: int, data: memoryview) -> None:
        """Chunk ``index`` into the partial file, unless the exchange put it there itself."""
        if self.exchange is None:
            out.write(data, index * self.chunk)
            return
        if not self.exchange.stored(index):
            out.write(data, index * self.chunk)
        self.exchange.written(index)

    def _most_workers(self) -> int:
        """How many connections this download may grow to (a swarm's never grow: every node
        fetches its share of the origin's chunks one at a time)."""
        n = min(self.opts.connections, self.chunks)
        return n if self.exchange is not None else max(n, min(self.opts.max_connections, self.chunks))

    def _grow(self, workers: list[Future[None]], add: Callable[[], Future[None]], most: int) -> None:
        """Double the workers, up to ``most``, while each doubling raises the rate the bytes come
        at by :data:`GROWTH` (see ``TransferOptions.max_connections``) and enough of the file is
        left to repay new connections (:data:`WORTH` seconds at the rate so far); returns when a
        doubling does not pay, or when the download ends or stops."""

        def pause(seconds: float) -> bool:  # True when the download ended (or stopped) meanwhile
            return not futures.wait(workers, timeout=seconds).not_done

        def rate() -> float | None:  # bytes a second over the next PROBE seconds
            before, t0 = self.fetched, time.monotonic()
            if pause(PROBE):
                return None
            return (self.fetched - before) / (time.monotonic() - t0)

        if pause(PROBE):  # the first connections set up and reach full speed
            return
        last = rate()
        while last and len(workers) < most and self.remote.size - self.resumed - self.fetched > last * WORTH:
            more = min(len(workers), most - len(workers))
            self.buffers.grow(more)  # a buffer each: the number in use stays connections + 2
            workers += [add() for _ in range(more)]
            if pause(PROBE):  # the new connections' first bytes
                return
            now = rate()
            log.info("%s: %d connections, %.0f MB/s (was %.0f)", self.path, len(workers),
                     (now or 0) / 1e6, last / 1e6)
            if now is None or now < last * (1 + GROWTH):
                return
            last = now

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
