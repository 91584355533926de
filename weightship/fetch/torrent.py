"""The ``torrent`` source: a ``.torrent`` file, a magnet link, or a catalog card's torrent.

Steps (see :mod:`weightship.fetch.engine` for what happens around them):

1. **Metadata.** From the ``.torrent`` file (within libtorrent's load limits), or from peers
   for a magnet link (``--peer``, ``--peers-from-dns``, ``--tracker``, the magnet's own
   trackers and ``x.pe`` peers). Every file name passes the path sanitizer before the torrent
   is added to a session for download (:mod:`weightship.torrent.metadata`).
2. **Plan.** The files: the card layout's default files, or every file of the torrent, filtered
   by ``--include``/``--exclude``. Their sha256 comes from a trust anchor, in this order: a
   manifest given with ``--manifest`` (anchor ``manifest``), the catalog card (``catalog``),
   the digests ``weightship torrent create`` put into the info dict (``torrent``: covered by the
   infohash). A torrent that publishes no digests (e.g. the original Mistral 7B release) is
   trusted through its piece hashes alone: its files get ``anchor: "torrent"`` and the sha256
   of the piece-verified bytes, and the manifest records the infohash.
3. **Download** (the engine's bulk hook): one libtorrent session downloads only the planned
   files (priority 0 for the rest) into ``DIR/.weightship/incoming/.torrent-INFOHASH/``, saving
   fast-resume data every few seconds, so a killed fetch restarts where it was.
4. **Hand over.** Files with a trusted sha256 are moved to their staging paths; the engine
   hashes and promotes them. Files trusted by piece hashes alone are streamed to the engine
   through :meth:`TorrentSource.fetch_file` (the engine hashes them on the way in).
5. ``--seed-for DURATION``: after the engine has promoted everything, the model directory is
   seeded for that long.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import libtorrent as lt

from weightship.errors import (
    DigestMismatchError,
    FetchError,
    ManifestError,
    TorrentMetadataError,
    UsageError,
)
from weightship.fetch.base import FetchPlan, FetchRequest, PlannedFile, Sink, Source
from weightship.fetch.select import wanted_by
from weightship.manifest import Manifest, SourceInfo, atomic_write
from weightship.paths import STATE_DIR, PathsUnder, open_beneath, open_dir_beneath, replace_beneath
from weightship.progress import NullProgress, Progress
from weightship.torrent.metadata import MAX_METADATA_BYTES, TorrentMeta, check_torrent, load_torrent_bytes
from weightship.torrent.peers import PeerSource
from weightship.torrent.settings import SessionOptions
from weightship.torrent.swarm import Swarm

log = logging.getLogger(__name__)

_CHUNK = 4 << 20
# Fast-resume data is a few KB (a bitfield and the unfinished pieces' blocks); writing it every
# 2 s bounds what a kill -9 costs to ~2 s of transfer, with no re-hash of what was verified.
TORRENT_FILE = "source.torrent"  # kept in DIR/.weightship/ so `weightship seed DIR` can reuse it


class TorrentSource(Source):
    """Fetches a model over BitTorrent; see the module docstring."""

    kind: ClassVar[str] = "torrent"
    network: ClassVar[bool] = False  # fetch_file streams what fetch_many already downloaded

    def __init__(self, request: FetchRequest, spec: Mapping[str, Any] | None = None) -> None:
        super().__init__(request, spec)
        fleet = self.request.options.peers
        self._peers = PeerSource.from_options(fleet.peers, fleet.peers_from_dns)
        self._trackers: list[str] = list(self.request.options.torrent.trackers)
        self._session_opts = SessionOptions(listen=fleet.listen or "0.0.0.0:0,[::]:0")
        self._meta: TorrentMeta | None = None
        self._swarm: Swarm | None = None
        self._store: Path | None = None  # where libtorrent wrote the payload
        self._root: Path | None = None  # the model directory, and its staging directory
        self._incoming: Path | None = None
        self._delivered = False
        self._bulk = (0, 0)
        self._traffic: dict[str, tuple[int, int]] = {}

    # ---- plan --------------------------------------------------------------------------------

    def _uri(self) -> str:
        if self.request.card is not None:
            magnet = self.spec.get("magnet")
            if not isinstance(magnet, str):
                raise UsageError(f"{self.request.card.name}: its torrent source has no magnet link")
            return magnet
        return self.request.ref

    def _swarm_for(self, progress: Progress) -> Swarm:
        if self._swarm is None:
            self._swarm = Swarm(self._session_opts, progress, self._peers)
        self._swarm.progress = progress
        return self._swarm

    def _load_meta(self) -> TorrentMeta:
        uri = self._uri()
        if not uri.startswith("magnet:"):
            path = Path(uri)
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_METADATA_BYTES + 1)
            except OSError as e:
                raise FetchError(f"cannot read {path}: {e.strerror or e}") from None
            return load_torrent_bytes(data, str(path))
        try:
            atp = lt.parse_magnet_uri(uri)
        except RuntimeError as e:
            raise UsageError(f"not a valid magnet link: {e}") from None
        atp.save_path = tempfile.mkdtemp(prefix="weightship-magnet-")  # nothing is written there
        atp.trackers = list(atp.trackers) + self._trackers
        try:
            info = self._swarm_for(NullProgress()).fetch_metadata(
                atp, timeout=self.request.options.torrent.metadata_timeout)
        finally:
            shutil.rmtree(atp.save_path, ignore_errors=True)
        return check_torrent(info, f"metadata of {uri[:80]}")

    def plan(self) -> FetchPlan:
        meta = self._meta = self._load_meta()
        by_path = meta.by_path()
        card = self.request.card
        layout = card.layout(self.spec.get("layout") or self.request.layout) if card else None
        if layout is not None and layout.torrent and layout.torrent.get("infohash") not in (
                meta.infohash, str(meta.info.info_hashes().v2)):
            raise TorrentMetadataError(self._uri()[:80], f"infohash {meta.infohash} is not the "
                                       f"card's {layout.torrent.get('infohash')}")
        manifest = self._given_manifest()
        wanted: list[tuple[str, int | None, str | None, str]]
        if manifest is not None:
            wanted = [(f.path, f.size, f.sha256, "manifest") for f in manifest.files]
        elif layout is not None and layout.files is not None:
            wanted = [(f.path, f.size, f.sha256 or meta.sha256.get(f.path),
                       "catalog" if f.sha256 else "torrent") for f in layout.default_files()]
        else:
            wanted = [(f.path, f.size, meta.sha256.get(f.path), "torrent") for f in meta.files]
        files = []
        selected = wanted_by(self.request, self.default_optional)  # the engine's own filter
        for path, size, sha, anchor in wanted:
            if not selected(path):
                continue
            tf = by_path.get(path)
            if tf is None:
                raise FetchError(f"the torrent {meta.infohash} has no file {path!r}",
                                 hint="torrent files: " + ", ".join(sorted(by_path)[:20]))
            if size is not None and size != tf.size:
                raise DigestMismatchError(path, expected=f"{size} bytes",
                                          actual=f"{tf.size} bytes in the torrent", what="size")
            files.append(PlannedFile(path=path, size=tf.size, sha256=sha, anchor=anchor,
                                     locator=f"magnet:?xt=urn:btih:{meta.infohash}&so={tf.index}"))
        if not files:
            raise UsageError("no torrent file matches --include/--exclude")
        name = card.name if card else meta.name
        return FetchPlan(name=name, layout=layout.name if layout else _guess_layout(files),
                         files=files, source=SourceInfo(kind="torrent", uri=self._uri(),
                                                        infohash=meta.infohash))

    def _given_manifest(self) -> Manifest | None:
        given = self.request.options.manifest
        return Manifest.load(given) if given else None

    # ---- fetch -------------------------------------------------------------------------------

    def fetch_many(self, files: list[PlannedFile], staging: dict[str, Path], *, root: Path,
                   incoming: Path, progress: Progress) -> bool:
        meta = self._meta
        assert meta is not None, "plan() must run before fetch_many()"
        self._root, self._incoming = root, incoming
        store = self._store = incoming / f".torrent-{meta.infohash}"
        os.close(open_dir_beneath(root, store.relative_to(root), create=True))  # never a planted link
        by_path = meta.by_path()
        atp = self._resume_params(incoming / f".torrent-{meta.infohash}.resume")
        atp.ti = meta.info
        atp.save_path = str(store)
        # Every file is written under a checked name: libtorrent's own (sanitised) names are
        # never used, and a name the sanitizer rejected never reached this point.
        under = PathsUnder(store)
        atp.renamed_files = {f.index: str(under.resolve(f.path).relative_to(under.root)) for f in meta.files}
        wanted = {by_path[f.path].index for f in files}
        atp.file_priorities = [4 if i in wanted else 0 for i in range(meta.info.num_files())]
        atp.trackers = list(self._trackers)
        for f in files:
            progress.file_begin(f.path, f.size)
        swarm = self._swarm_for(progress)
        opts = self.request.options.torrent
        handle = swarm.download(
            atp, {by_path[f.path].index: f.path for f in files}, stall_timeout=opts.stall_timeout,
            resume_path=incoming / f".torrent-{meta.infohash}.resume", resume_every=opts.resume_every)
        swarm.remove(handle)
        progress.note(f"torrent {meta.infohash}: {swarm.downloaded_bytes:,} bytes from peers, "
                      f"{swarm.resumed_bytes:,} bytes resumed from an earlier run, "
                      f"{swarm.hash_failures} pieces failed their hash")
        for f in files:
            if f.sha256 is not None:  # trusted digest: the engine checks the moved file
                # by descriptors, refusing a link swapped in since the names were checked
                replace_beneath(root, (store / f.path).relative_to(root), staging[f.path].relative_to(root))
        self._delivered = True
        self._bulk = (swarm.downloaded_bytes, swarm.resumed_bytes)
        self._traffic = {f.path: (t[0], t[1]) for f in files
                         if (t := swarm.file_traffic.get(by_path[f.path].index)) is not None}
        return True

    def bulk_bytes(self) -> tuple[int, int]:
        """The payload that came from peers (and web seeds) in this run, and what an earlier
        run had already verified."""
        return self._bulk

    def bulk_traffic(self) -> dict[str, tuple[int, int]]:
        """Per file, the payload from the origin (seeders and web seeds that are not the fleet's)
        and from the fleet's peers (--peer, --peers-from-dns), in this run."""
        return self._traffic

    def _resume_params(self, path: Path) -> lt.add_torrent_params:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return lt.add_torrent_params()
        try:
            atp: lt.add_torrent_params = lt.read_resume_data(data)
            log.info("resuming from %s", path)
            return atp
        except RuntimeError as e:
            log.warning("ignoring unreadable resume data %s: %s", path, e)
            return lt.add_torrent_params()

    def fetch_file(self, file: PlannedFile, sink: Sink) -> None:
        """Stream a file the torrent delivered and only piece hashes vouch for."""
        if self._store is None or not self._delivered:
            raise FetchError(f"{file.path}: the torrent did not deliver it")
        if file.sha256 is not None:  # it was delivered, and the engine found the wrong digest
            raise DigestMismatchError(file.path, expected=file.sha256,
                                      actual=f"other bytes in torrent {self._meta.infohash if self._meta else ''}")
        with os.fdopen(open_beneath(self._store, file.path, os.O_RDONLY), "rb") as f:
            while chunk := f.read(_CHUNK):
                sink.write(chunk)

    def close(self) -> None:
        try:
            self._seed_after_fetch()
        finally:
            if self._swarm is not None:
                self._swarm.close()
                self._swarm = None
            if self._delivered and self._incoming is not None and self._meta is not None:
                shutil.rmtree(self._incoming / f".torrent-{self._meta.infohash}", ignore_errors=True)
                (self._incoming / f".torrent-{self._meta.infohash}.resume").unlink(missing_ok=True)

    def _seed_after_fetch(self) -> None:
        seed_for = self.request.options.peers.seed_for
        if not self._delivered or self._root is None or self._meta is None:
            return
        directory = self._root
        try:
            manifest = Manifest.load(directory)
        except ManifestError:
            return  # the fetch failed after the download; nothing verified to seed
        if manifest.source is None or manifest.source.infohash != self._meta.infohash:
            return
        atomic_write(directory / STATE_DIR / TORRENT_FILE, self._meta.torrent_bytes())
        if not seed_for:
            return
        from weightship.torrent.seed import seed_directory

        seed_directory(directory, torrent=self._meta.torrent_bytes(), listen=self._session_opts.listen,
                       duration=seed_for, peers=self._peers, progress=self._swarm.progress
                       if self._swarm else NullProgress(), check=False)


def _guess_layout(files: list[PlannedFile]) -> str | None:
    names = {f.path for f in files}
    return "hf" if "config.json" in names else "original" if "params.json" in names else None

