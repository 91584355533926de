"""Hashing a file's contiguous prefix while its chunks arrive out of order."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

from weightship.errors import FetchError
from weightship.verify.digests import git_blob_hasher


class PrefixHasher:
    """Hashes chunks in order, in its own thread, as they finish.

    Finished chunks wait in memory for their turn; chunks from an earlier run (offered without
    bytes) are read back from disk once. hashlib releases the GIL on large updates, so hashing
    runs beside the network threads instead of after them. ``on_hashed(index, data)`` is
    called after each chunk (``data`` as offered), outside any lock.
    """

    def __init__(self, fd: int, size: int, chunk: int, *, git_sha1: bool, enabled: bool,
                 on_hashed: Callable[[int, memoryview | None], None]) -> None:
        self._fd, self._size, self._chunk = fd, size, chunk
        self.sha256 = hashlib.sha256() if enabled else None
        self.git = git_blob_hasher(size) if git_sha1 and enabled else None
        self.next = 0  # first chunk not hashed yet
        self._ready: dict[int, memoryview | None] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._on_hashed = on_hashed
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="ws-hash", daemon=True)
        self._thread.start()

    def _update(self, data: bytes | memoryview) -> None:
        if self.sha256 is not None:
            self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)

    def offer(self, index: int, data: memoryview | None) -> None:
        """Chunk ``index`` is complete: its bytes, or None when they are only on disk."""
        with self._cond:
            self._ready[index] = data
            self._cond.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while self.next not in self._ready and not self._closed:
                        self._cond.wait()
                    if self.next not in self._ready:
                        return
                    index = self.next
                    data = self._ready.pop(index)
                if data is None:
                    if self.sha256 is not None or self.git is not None:  # else nothing to hash
                        self._hash_from_disk(index)
                else:
                    self._update(data)
                with self._cond:
                    self.next += 1
                self._on_hashed(index, data)
        except BaseException as e:  # reported by close(); the download fails with it
            self.error = e

    def _hash_from_disk(self, index: int) -> None:
        start = index * self._chunk
        end = min(start + self._chunk, self._size)
        while start < end:
            data = os.pread(self._fd, min(4 << 20, end - start), start)
            if not data:
                raise FetchError(f"partial download shrank at byte {start}")
            self._update(data)
            start += len(data)

    def close(self) -> None:
        """Hash whatever is ready and in order, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self.error is not None:
            raise self.error
