"""The hook through which a ranged download's chunks may come from somewhere besides the origin.

:func:`weightship.fetch.download.download` fetches a file chunk by chunk. Given a
:class:`ChunkExchange` (the fleet swarm, :mod:`weightship.swarm`), it asks the exchange for each
chunk instead of reading the origin itself; the exchange takes the chunk from a peer, or calls
back into the download's own origin reader (the same retries, stall detection and reply checks
as without peers). Everything else stays the downloader's: the journal, resume, the buffers, the
sha256 of the whole file hashed while the chunks arrive, and the check against the trust
anchor's digest. When that check fails, the exchange names the chunks to fetch again (those
whose senders it caught lying); the downloader rewinds its journal by them and resumes.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable


class Stopped(Exception):
    """Another worker of the download failed; this one stops without adding an error of its own."""




# Reads chunk ``index`` from the origin into a buffer of the chunk's length; returns it filled.
OriginRead = Callable[[int, memoryview], memoryview]


class ChunkExchange(ABC):
    """Where one file's chunks may come from, besides the origin; see the module docstring."""

    @abstractmethod
    def begin(self, fd: int, size: int, chunk: int, done: set[int], stop: threading.Event,
              origin: OriginRead) -> set[int]:
        """A download (or a resume of it) starts: the partial file is open as ``fd``, ``done``
        chunks of ``chunk`` bytes are on disk. Returns those of ``done`` to fetch again (their
        bytes cannot be vouched for). ``stop`` is set when the download gives up; ``origin``
        reads a chunk from the origin (the exchange may write chunks it reads into ``fd``
        itself, ahead of the download)."""

    @abstractmethod
    def fetch(self, index: int, into: memoryview, origin: OriginRead,
              advance: Callable[[int], None]) -> memoryview:
        """Chunk ``index`` into ``into`` (its exact length), from a peer or through ``origin``;
        ``advance(n)`` counts bytes that came from a peer."""

    def stored(self, index: int) -> bool:
        """Whether chunk ``index``, as :meth:`fetch` gave it, is in the partial file already (the
        exchange wrote it there itself), so the download need not write it again."""
        return False

    @abstractmethod
    def written(self, index: int) -> None:
        """Chunk ``index`` is in the partial file (before the journal records it)."""

    @abstractmethod
    def suspects(self, origin: OriginRead) -> set[int] | None:
        """The file's digest did not match: chunks to fetch again (possibly none, when the
        exchange put right what it found), having banned the peers that sent wrong bytes. None
        when no peer is to blame (the origin's bytes are wrong)."""

    @abstractmethod
    def end(self, verified: bool) -> None:
        """The download ended: the file matched its digest, or it is abandoned."""
