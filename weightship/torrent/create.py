"""``weightship torrent create``: a torrent for a verified model directory.

The files are those the directory's manifest lists (never whatever else lies around, never
``.weightship/``), in the manifest's order. The torrent is a v1+v2 hybrid by default (BEP 52:
v2 clients get per-file merkle roots, v1 clients still join), or v1 only for older clients such
as Debian's aria2 1.36 and transmission 3.00. The manifest's sha256 digests go into the info
dict as ``x-weightship-sha256`` (see :mod:`weightship.torrent.metadata`), so a bare magnet link
is enough for a leecher to check every file against the same digests as the Hub and S3 copies.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

from weightship import __version__
from weightship.errors import TorrentError, UsageError
from weightship.manifest import Manifest
from weightship.paths import PathsUnder
from weightship.torrent.metadata import SHA256_KEY, TorrentMeta, load_torrent_bytes

MIN_PIECE = 256 << 10
MAX_PIECE = 16 << 20
TARGET_PIECES = 1500  # a few thousand pieces keep the metadata small and the picker cheap


def piece_size_for(total_bytes: int) -> int:
    """The piece size for ``total_bytes``: a power of two giving about 1,500 pieces, 256 KiB–16 MiB.

    14.5 GB gets 16 MiB pieces (~860 pieces, ~17 KB of v1 hashes); the 17 MB tiny model gets
    256 KiB (68 pieces). Bigger pieces than 16 MiB make each hash failure expensive.
    """
    size = MIN_PIECE
    while size < MAX_PIECE and size * TARGET_PIECES < total_bytes:
        size *= 2
    return size


@dataclass(frozen=True)
class Created:
    """A torrent made by :func:`create_torrent`."""

    data: bytes  # the .torrent file
    meta: TorrentMeta

    @property
    def magnet(self) -> str:
        """A magnet link naming both infohashes (when hybrid) and the trackers."""
        uri: str = lt.make_magnet_uri(self.meta.info)
        return uri


def create_torrent(directory: Path, *, trackers: list[str] | tuple[str, ...] = (),
                   webseeds: list[str] | tuple[str, ...] = (), piece_size: int | None = None,
                   v1_only: bool = False, name: str | None = None, private: bool = False) -> Created:
    """Make a torrent of the files ``directory``'s manifest lists; see the module docstring."""
    manifest = Manifest.load(directory)
    if not manifest.files:
        raise UsageError(f"{directory}: the manifest lists no files")
    root_name = name or manifest.name
    under = PathsUnder(directory)
    for f in manifest.files:
        path = under.resolve(f.path)
        if not path.is_file() or path.stat().st_size != f.size:
            raise UsageError(f"{directory}: {f.path} is missing or not {f.size:,} bytes",
                             hint="run `weightship verify` on the directory, or fetch it again")
    total = manifest.total_bytes
    size = piece_size or piece_size_for(total)
    if size < 16 << 10 or size & (size - 1):
        raise UsageError(f"piece size {size} must be a power of two of at least 16 KiB")
    entries = [lt.create_file_entry(f"{root_name}/{f.path}", f.size) for f in manifest.files]
    flags = lt.create_torrent.v1_only if v1_only else 0
    ct = lt.create_torrent(entries, size, flags)
    ct.set_creator(f"weightship {__version__}")
    for tier, url in enumerate(trackers):
        ct.add_tracker(url, tier)
    for url in webseeds:
        ct.add_url_seed(url)
    if private:
        ct.set_priv(True)
    with tempfile.TemporaryDirectory(prefix="weightship-torrent-") as tmp:
        # libtorrent reads ROOT/NAME/PATH; a link NAME -> directory lets the model directory
        # keep whatever name it has.
        os.symlink(directory.resolve(), Path(tmp) / root_name)
        try:
            lt.set_piece_hashes(ct, tmp)
        except RuntimeError as e:
            raise TorrentError(f"{directory}: hashing pieces failed: {e}") from None
    torrent = ct.generate()
    torrent[b"info"][SHA256_KEY] = {f.path.encode(): f.sha256.encode() for f in manifest.files}
    data: bytes = lt.bencode(torrent)
    return Created(data=data, meta=load_torrent_bytes(data, str(directory)))
