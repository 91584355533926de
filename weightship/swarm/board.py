"""What this node shares: the files it registered by digest, their chunks, and its event log.

A file is registered with a read-only descriptor the fetch opened itself (of the partial file
being written, or of a verified file): serving never opens anything by name, so a peer cannot
make a node read another file, and a link planted in the directory later changes nothing. A
descriptor is closed only when no reply is still reading it (a closed descriptor's number could
be reused by another file in the middle of a reply).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from weightship.swarm.protocol import MAX_EVENTS, chunks_of


@dataclass
class SharedFile:
    """One file this node serves."""

    sha256: str
    size: int
    chunk: int
    fd: int
    have: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (provenance, digest)
    done: bool = False
    readers: int = 0  # replies reading ``fd`` now
    busy: dict[int, int] = field(default_factory=dict)  # chunk -> replies reading it now
    retired: bool = False  # unshared: close ``fd`` when the last reader is done
    sent: int = 0  # bytes served to peers

    def covers(self, start: int, end: int) -> bool:
        """Whether every chunk that bytes ``[start, end)`` touch is on disk."""
        if self.done:
            return end <= self.size
        return all(i in self.have for i in range(start // self.chunk, (end - 1) // self.chunk + 1))


class Board:
    """This node's shared files and the log of events peers read (see :mod:`.protocol`)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.epoch = secrets.token_hex(8)  # a new one per process: readers start over
        lock = threading.RLock()
        self.cond = threading.Condition(lock)
        # readers' progress, apart: an events stream reports it after every line it writes, and
        # waking every other stream (waiting on ``cond`` for news) each time would be waste
        self._seen_cond = threading.Condition(lock)
        self.log: list[list[Any]] = []
        self.files: dict[str, SharedFile] = {}
        self.retired: list[SharedFile] = []
        self.seen: dict[str, int] = {}  # reader node id -> how much of the log it has read
        self.closed = False

    def _emit(self, *event: Any) -> None:
        self.log.append(list(event))
        self.cond.notify_all()

    def share(self, sha256: str, size: int, chunk: int, fd: int) -> None:
        """Serve ``fd`` (ours from now on) as the file ``sha256``, replacing an earlier share."""
        with self.cond:
            self._retire(sha256)
            self.files[sha256] = SharedFile(sha256, size, chunk, fd)
            self._emit("file", sha256, size, chunk)

    def have(self, sha256: str, index: int, provenance: str, digest: str) -> None:
        """Chunk ``index`` of ``sha256`` is on disk."""
        with self.cond:
            f = self.files.get(sha256)
            if f is not None and 0 <= index < chunks_of(f.size, f.chunk):
                f.have[index] = (provenance, digest)
                self._emit("have", sha256, index, provenance, digest)

    def take(self, sha256: str, index: int, *, origin: bool) -> None:
        """This node starts fetching chunk ``index`` (from the origin, or a peer)."""
        with self.cond:
            if sha256 in self.files:
                self._emit("take", sha256, index, "o" if origin else "p")

    def drop(self, sha256: str, indices: set[int]) -> None:
        """These chunks are to be written again: no reply starts on them from now on, and this
        returns once none is still reading them (a reply sending the old bytes while new ones
        are written over them would send bytes that match neither its claim nor the new one)."""
        with self.cond:
            f = self.files.get(sha256)
            if f is None:
                return
            for i in sorted(indices):
                if f.have.pop(i, None) is not None:
                    self._emit("drop", sha256, i)
            while any(f.busy.get(i, 0) > 0 for i in indices):
                self.cond.wait(1.0)

    def done(self, sha256: str) -> None:
        """The whole file matched its trusted digest."""
        with self.cond:
            f = self.files.get(sha256)
            if f is not None and not f.done:
                f.done = True
                self._emit("done", sha256)

    def unshare(self, sha256: str) -> None:
        """Stop serving ``sha256``; what was said about it is void."""
        with self.cond:
            if self._retire(sha256):
                self._emit("gone", sha256)

    def _retire(self, sha256: str) -> bool:
        f = self.files.pop(sha256, None)
        if f is None:
            return False
        f.retired = True
        self.retired.append(f)
        if f.readers == 0:
            os.close(f.fd)
        return True

    @contextlib.contextmanager
    def reading(self, sha256: str, start: int,
                end: int) -> Iterator[tuple[SharedFile, tuple[str, str] | None] | None]:
        """The shared file when it holds bytes ``[start, end)``, kept open (and those chunks
        unchanged) while in use; with the (provenance, digest) it publishes for that chunk when
        the range is one chunk."""
        with self.cond:
            f = self.files.get(sha256)
            if f is None or not f.covers(start, end):
                f = None
            else:
                f.readers += 1
                chunks = range(start // f.chunk, (end - 1) // f.chunk + 1)
                for i in chunks:
                    f.busy[i] = f.busy.get(i, 0) + 1
                claim = f.have.get(chunks[0]) if len(chunks) == 1 else None
        try:
            yield (f, claim) if f is not None else None
        finally:
            if f is not None:
                with self.cond:
                    f.readers -= 1
                    for i in chunks:
                        f.busy[i] -= 1
                    self.cond.notify_all()
                    if f.retired and f.readers == 0:
                        os.close(f.fd)

    def events(self, since: int, wait: float) -> tuple[int, list[list[Any]]]:
        """Events from ``since`` on (all of them when ``since`` is past the end: a reader of an
        earlier epoch), waiting up to ``wait`` seconds for one when there are none."""
        deadline = time.monotonic() + wait
        with self.cond:
            if since > len(self.log):
                since = 0
            while since == len(self.log) and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return min(len(self.log), since + MAX_EVENTS), self.log[since:since + MAX_EVENTS]

    def seen_by(self, reader: str, count: int) -> None:
        """The node ``reader`` has read the first ``count`` events (it asks for the next)."""
        with self.cond:
            self.seen[reader] = max(self.seen.get(reader, 0), min(count, len(self.log)))
            self._seen_cond.notify_all()

    def wait_seen(self, readers: set[str], timeout: float) -> bool:
        """Wait until each of ``readers`` has read every event logged so far (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            end = len(self.log)
            while any(self.seen.get(r, 0) < end for r in readers):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._seen_cond.wait(left)
        return True

    def sent(self) -> int:
        """Bytes served to peers so far."""
        with self.cond:
            return sum(f.sent for f in [*self.files.values(), *self.retired])

    def close(self) -> None:
        """Stop serving everything (wakes the long polls)."""
        with self.cond:
            self.closed = True
            for sha in list(self.files):
                self._retire(sha)
            self.cond.notify_all()
