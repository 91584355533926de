"""What every fetch source implements, and the plan a source makes for the engine."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from weightship.errors import DigestMismatchError
from weightship.fetch.options import FetchOptions
from weightship.manifest import SourceInfo
from weightship.progress import Progress
from weightship.verify.digests import git_blob_hasher

if TYPE_CHECKING:
    from weightship.catalog import Card
    from weightship.fetch.remote import RangeReader


@dataclass(frozen=True)
class PlannedFile:
    """One file to fetch, with the digests a trust anchor gave for it."""

    path: str  # relative POSIX path in the model directory; checked by the path sanitizer
    size: int | None
    sha256: str | None  # from a trust anchor; None when the anchor only has a git sha1
    git_sha1: str | None = None  # the Hub's git blob sha1 for small plain-git files
    anchor: str = "catalog"  # which trust anchor vouched for the digest
    locator: str | None = None  # where the source finds the bytes (URL, key, file index)

    def check(self, size: int, sha256: str | None, git_sha1: str | None = None) -> None:
        """Raise :class:`DigestMismatchError` unless what arrived (``size`` bytes, with these
        digests) is what the plan says: the one check every way of fetching a file ends with."""
        if self.size is not None and size != self.size:
            raise DigestMismatchError(self.path, expected=f"{self.size} bytes", actual=f"{size} bytes",
                                      what="size")
        if self.sha256 is not None and sha256 != self.sha256:
            raise DigestMismatchError(self.path, expected=self.sha256, actual=str(sha256))
        if self.git_sha1 is not None and git_sha1 != self.git_sha1:
            raise DigestMismatchError(self.path, expected=self.git_sha1, actual=str(git_sha1),
                                      what="git blob sha1")


@dataclass
class FetchPlan:
    """What a source will deliver: the files and their provenance."""

    name: str
    layout: str | None
    files: list[PlannedFile]
    source: SourceInfo


@dataclass(frozen=True)
class FetchRequest:
    """What the user asked for."""

    ref: str  # catalog name or URI
    card: Card | None = None
    layout: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    options: FetchOptions = field(default_factory=FetchOptions)  # how: revision, transfer, peers, …


class Sink:
    """Where a source writes one file's bytes: a staging file, hashed as the bytes arrive."""

    def __init__(self, fileobj: BinaryIO, *, expected_size: int | None, git_sha1: bool,
                 progress: Progress, path: str) -> None:
        self._file = fileobj
        self._sha256 = hashlib.sha256()
        self._git = None
        if git_sha1:
            assert expected_size is not None, "a git blob digest needs the size up front"
            self._git = git_blob_hasher(expected_size)
        self._progress = progress
        self._path = path
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` to the file and to the running digests."""
        self._file.write(data)
        self._sha256.update(data)
        if self._git is not None:
            self._git.update(data)
        self.bytes_written += len(data)
        self._progress.advance(self._path, len(data))

    def sha256(self) -> str:
        """Hex sha256 of everything written so far."""
        return self._sha256.hexdigest()

    def git_sha1(self) -> str | None:
        """Hex git blob sha1 of everything written, if it was asked for."""
        return self._git.hexdigest() if self._git is not None else None


class Source(ABC):
    """A place model files come from. One module per source, registered by kind and URI scheme
    in :mod:`weightship.fetch.registry`.

    A source is made for one request (and, for catalog models, one entry of the card's
    ``sources:`` list); the engine asks it for a plan, then for the files' bytes in one of three
    ways, the first the source offers: all at once (:meth:`fetch_many`, a torrent), by byte ranges
    (``reads_ranges``: :meth:`remote`, downloaded in parallel and resumably by the engine), or as
    one stream per file (:meth:`fetch_file`).
    """

    kind: ClassVar[str]
    network: ClassVar[bool] = True  # fetch_file's bytes come over the network (a download)
    # :meth:`remote` reads byte ranges: the engine's parallel, resumable downloader (and the
    # fleet swarm) fetch the files, under the request's transfer options
    reads_ranges: ClassVar[bool] = False
    # Globs of files fetched only when an --include names them, where no card says which
    # (a Hub repo's pickles and other frameworks' weights: weightship.fetch.select.DEFAULT_OPTIONAL)
    default_optional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, request: FetchRequest, spec: Mapping[str, Any] | None = None) -> None:
        self.request = request
        self.spec: Mapping[str, Any] = spec or {}

    @abstractmethod
    def plan(self) -> FetchPlan:
        """Resolve the request into files with sizes and trusted digests."""

    @abstractmethod
    def fetch_file(self, file: PlannedFile, sink: Sink) -> None:
        """Write the bytes of ``file`` into ``sink``, from its first byte."""

    def remote(self, file: PlannedFile) -> RangeReader:
        """A reader of ``file``'s byte ranges at this source; only where ``reads_ranges``."""
        raise NotImplementedError(f"the {self.kind} source does not read byte ranges")

    def fetch_many(self, files: list[PlannedFile], staging: dict[str, Path], *, root: Path,
                   incoming: Path, progress: Progress) -> bool:
        """Optionally fetch several files at once into their ``staging`` paths.

        ``root`` is the model directory and ``incoming`` the directory below it that holds the
        staging files (and any work space the source needs). Sources whose protocol delivers
        many files together (BitTorrent) override this and return True; the engine then hashes
        what they wrote against the plan. The default returns False, and the engine fetches each
        file by :meth:`remote` or :meth:`fetch_file` instead.
        """
        return False

    def bulk_bytes(self) -> tuple[int, int]:
        """What :meth:`fetch_many` moved in this run: (bytes from the network, bytes reused from
        an earlier run's partial download)."""
        return 0, 0

    def bulk_traffic(self) -> dict[str, tuple[int, int]]:
        """Per file path, what :meth:`fetch_many` moved in this run: (bytes from the origin, bytes
        from the fleet's peers). Empty when the source cannot tell."""
        return {}

    def uri_for(self, file: PlannedFile) -> str:
        """Where ``file``'s bytes came from, as recorded in the manifest."""
        return file.locator or f"{self.kind}:{file.path}"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, sessions or threads."""
