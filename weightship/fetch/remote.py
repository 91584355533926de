"""What a source's remote file offers the downloader: its size and validator, ranged reads into
a caller's buffer, and what a download of it produced."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from weightship.errors import RangeNotSupportedError


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
