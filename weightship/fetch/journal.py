"""The resume journal of a partial download: ``PATH.incomplete.journal`` beside the partial file.

It records what the partial was fetched against (size, chunk size, the remote's validator, the
expected digest) and which chunks are on disk. :mod:`weightship.fetch.download` replaces it
atomically after every finished chunk.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from weightship.paths import unlink_beneath

JOURNAL_SUFFIX = ".journal"
PROVENANCE_SUFFIX = ".peers"  # which peer sent each chunk (a swarm fetch's; see weightship.swarm)
_JOURNAL_VERSION = 1


@dataclass
class Journal:
    """What a partial download was fetched against, and which chunks are on disk."""

    size: int
    chunk_size: int
    validator: str | None
    digest: str | None  # the expected sha256 (or git sha1): a new plan means a new download
    done: list[int] = field(default_factory=list)
    version: int = _JOURNAL_VERSION

    def matches(self, other: Journal) -> bool:
        """Whether chunks recorded here are valid for a download described by ``other``."""
        return (self.version, self.size, self.validator, self.digest) == (
            other.version, other.size, other.validator, other.digest) and self.chunk_size >= 4096

    @classmethod
    def load(cls, path: Path) -> Journal | None:
        """The journal at ``path``, or None when absent or unreadable."""
        try:
            data = json.loads(path.read_text())
            journal = cls(**data)
        except (OSError, ValueError, TypeError):
            return None
        if not all(isinstance(i, int) for i in journal.done):
            return None
        return journal

    def save(self, path: Path) -> None:
        """Replace the journal atomically.

        Not fsynced: a SIGKILL leaves the page cache intact, and after a power loss the final
        sha256 check catches a chunk that was journaled but never reached the disk.
        """
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)


def journal_path(staging: Path) -> Path:
    """Where the resume journal of ``staging`` lives."""
    return staging.with_name(staging.name + JOURNAL_SUFFIX)


def provenance_path(staging: Path) -> Path:
    """Where a swarm fetch records, beside ``staging``, which node each chunk came from."""
    return staging.with_name(staging.name + PROVENANCE_SUFFIX)


def discard(staging: Path, root: Path) -> None:
    """Remove a partial download, its journal and its chunks' provenance, reaching them below
    ``root`` without following a symlink."""
    for path in (staging, journal_path(staging), provenance_path(staging)):
        unlink_beneath(root, path)
