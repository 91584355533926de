"""``weightship seed``: serve a verified model directory to peers.

The torrent is the one given (``--torrent FILE``), else the one a torrent fetch kept in
``DIR/.weightship/source.torrent``, else a new v1+v2 hybrid made from the directory's manifest.
Files are mapped by their manifest paths whatever the directory is called. A torrent made here
from files just hashed is added in seed mode (no second read); any other torrent is checked
against the files first, so a damaged directory is never served as complete.

The directory may sit in a cache other pods share (a node's hostPath, the P2P seeder's volume),
and libtorrent opens the files by name, whenever a peer asks: nothing can make it refuse a
symlink. So each file is opened here first without following a link below the directory
(:func:`weightship.paths.open_beneath`) and its identity (device, inode) kept, and while seeding
every file is looked at again each half second: a file that became a link or another file stops
the seeding with :class:`~weightship.errors.TorrentError`, instead of serving what it now points
to.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

from weightship.errors import TorrentError, UnsafePathError, UsageError
from weightship.manifest import Manifest
from weightship.paths import STATE_DIR, PathsUnder, open_beneath
from weightship.progress import NullProgress, Progress
from weightship.torrent.create import create_torrent
from weightship.torrent.metadata import TorrentMeta, load_torrent_bytes
from weightship.torrent.peers import PeerSource
from weightship.torrent.settings import SessionOptions
from weightship.torrent.swarm import Swarm

log = logging.getLogger(__name__)

KEPT_TORRENT = "source.torrent"


@dataclass
class Seeding:
    """What a running seeder announces about itself."""

    infohash: str
    magnet: str
    listen: list[str]
    torrent: bytes
    files: int
    uploaded: Callable[[], int] | None = None  # payload bytes served so far (while seeding)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (without the torrent's bytes)."""
        return {"event": "seeding", "infohash": self.infohash, "magnet": self.magnet,
                "listen": self.listen, "files": self.files}


def torrent_for(directory: Path, torrent: bytes | None, trackers: list[str]) -> tuple[TorrentMeta, bool]:
    """The torrent to seed, and whether it was made here from the files (trusted as is)."""
    if torrent is not None:
        return load_torrent_bytes(torrent, "--torrent"), False
    kept = directory / STATE_DIR / KEPT_TORRENT
    if kept.is_file():
        return load_torrent_bytes(kept.read_bytes(), str(kept)), False
    created = create_torrent(directory, trackers=trackers)
    return created.meta, True


def seed_directory(directory: Path, *, torrent: bytes | None = None, listen: str = "0.0.0.0:6881",
                   duration: float = float("inf"), announce: list[str] | None = None,
                   peers: PeerSource | None = None, upload_limit: int = 0,
                   progress: Progress | None = None, check: bool = True,
                   on_ready: Callable[[Seeding], None] | None = None,
                   stop: Callable[[], bool] | None = None) -> int:
    """Seed ``directory`` for ``duration`` seconds; returns the payload bytes uploaded."""
    progress = progress or NullProgress()
    manifest = Manifest.load(directory)
    meta, fresh = torrent_for(directory, torrent, list(announce or ()))
    listed = {f.path: f for f in manifest.files}
    for f in meta.files:
        entry = listed.get(f.path)
        if entry is None or entry.size != f.size:
            raise UsageError(f"{directory} does not hold {f.path} as the torrent describes it",
                             hint="seed the directory the torrent was made from, or make a new "
                                  "torrent with `weightship torrent create`")
    swarm = Swarm(SessionOptions(listen=listen, upload_limit=upload_limit), progress, peers)
    try:
        atp = lt.add_torrent_params()
        atp.ti = meta.info
        atp.save_path = str(directory.resolve())
        under = PathsUnder(directory)
        atp.renamed_files = {f.index: str(under.resolve(f.path).relative_to(under.root)) for f in meta.files}
        identity = _identities(directory, [f.path for f in meta.files])
        atp.trackers = list(announce or ())
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        if fresh or not check:
            atp.flags |= lt.torrent_flags.seed_mode
        if upload_limit:
            atp.upload_limit = upload_limit
        handle = swarm.session.add_torrent(atp)
        while not handle.status().is_seeding:
            swarm.poll()
            st = handle.status()
            if st.state in (lt.torrent_status.downloading, lt.torrent_status.finished):
                raise TorrentError(f"{directory} does not hold every piece of the torrent "
                                   f"({st.progress:.1%} present)",
                                   hint="run `weightship verify` and fetch the missing files again")
        port = swarm.session.listen_port()
        info = Seeding(infohash=meta.infohash, magnet=lt.make_magnet_uri(meta.info),
                       listen=[f"{host}:{port}" for host in _hosts(listen)], torrent=meta.torrent_bytes(),
                       files=len(meta.files), uploaded=lambda: int(handle.status().total_payload_upload))
        if on_ready is not None:
            on_ready(info)
        end = time.monotonic() + duration
        while time.monotonic() < end and not (stop is not None and stop()):
            swarm.poll(500)
            swarm.dial(handle)
            _check_unchanged(directory, identity)
        uploaded: int = handle.status().total_payload_upload
        return uploaded
    finally:
        swarm.close()


def _identity(directory: Path, rel: str) -> tuple[int, int]:
    """(device, inode) of the regular file ``directory/rel``, reached without following a link."""
    fd = open_beneath(directory, rel, os.O_RDONLY)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(rel, "is not a regular file")
    return st.st_dev, st.st_ino


def _identities(directory: Path, paths: list[str]) -> dict[str, tuple[int, int]]:
    return {rel: _identity(directory, rel) for rel in paths}


def _check_unchanged(directory: Path, identity: dict[str, tuple[int, int]]) -> None:
    """Stop seeding when a file was swapped (for a link, or another file) since it was checked."""
    for rel, was in identity.items():
        try:
            now: tuple[int, int] | None = _identity(directory, rel)
        except (OSError, UnsafePathError):
            now = None
        if now != was:
            raise TorrentError(f"{directory}: {rel} was replaced (or became a link) while seeding; "
                               "stopped rather than serve what it points to now",
                               hint="another process writes this directory; verify it, then seed again")


def _hosts(listen: str) -> list[str]:
    return [part.rsplit(":", 1)[0] for part in listen.split(",") if part]
