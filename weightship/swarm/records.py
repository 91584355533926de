"""Where each chunk of a partial file came from: kept beside it, so a restarted node knows.

``PATH.incomplete.peers`` holds one line per chunk, ``INDEX PROVENANCE DIGEST SENDER``: the node
that fetched the chunk from the origin (or verified the whole file), the chunk's digest, and the
peer that sent it (``origin`` for the origin). A line is appended when the chunk is written,
before the download's journal records it, so every chunk the journal lists has a line (a line
without a journal entry is ignored). The file is rewritten whole when chunks are dropped. It is
opened without following a link below the model directory, like every file the fetch writes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from weightship.fetch.journal import provenance_path
from weightship.paths import open_beneath
from weightship.swarm.protocol import NODE_ID, SHA256

ORIGIN = "origin"


@dataclass(frozen=True)
class Record:
    """Where one chunk on disk came from."""

    provenance: str  # the node that fetched it from the origin (or verified its whole file)
    digest: str  # the chunk's digest (:func:`~weightship.swarm.protocol.chunk_digest`)
    sender: str  # the peer endpoint that sent it, or "origin"


class ProvenanceLog:
    """The provenance file of one partial download; see the module docstring."""

    def __init__(self, staging: Path, root: Path) -> None:
        self.path = provenance_path(staging)
        self.root = root
        self._fd: int | None = None
        self._lock = threading.Lock()

    def load(self, chunks: int) -> dict[int, Record]:
        """The records in the file (chunk indices below ``chunks``, well-formed lines only)."""
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError):
            return {}
        found: dict[int, Record] = {}
        for line in text.splitlines():
            parts = line.split(" ")
            if (len(parts) == 4 and parts[0].isdigit() and int(parts[0]) < chunks
                    and NODE_ID.match(parts[1]) and SHA256.match(parts[2])):
                found[int(parts[0])] = Record(parts[1], parts[2], parts[3])
        return found

    def _open(self, flags: int) -> int:
        return open_beneath(self.root, self.path.relative_to(self.root), os.O_WRONLY | os.O_CREAT | flags, 0o644)

    def append(self, index: int, rec: Record) -> None:
        """Add chunk ``index``'s record."""
        with self._lock:
            if self._fd is None:
                self._fd = self._open(os.O_APPEND)
            os.write(self._fd, _line(index, rec))

    def rewrite(self, records: dict[int, Record]) -> None:
        """Replace the file's content with ``records``."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = self._open(os.O_TRUNC | os.O_APPEND)
            os.write(self._fd, b"".join(_line(i, r) for i, r in sorted(records.items())))

    def close(self, *, remove: bool = False) -> None:
        """Close the file (and remove it, once the file it describes is verified)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if remove:
            self.path.unlink(missing_ok=True)


def _line(index: int, rec: Record) -> bytes:
    return f"{index} {rec.provenance} {rec.digest} {rec.sender}\n".encode()
