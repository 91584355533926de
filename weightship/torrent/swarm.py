"""Driving one libtorrent session from the calling thread: metadata, download, resume, bans.

libtorrent runs its own threads and reports through alerts; :class:`Swarm` polls them, turns
errors into weightship errors, keeps peers connected (explicit and DNS-discovered ones are
re-dialled every few seconds, so seeders that start late are found), writes fast-resume data
periodically, and reports bytes per file, peers, rates and bans through :class:`Progress`.

Smart-ban (libtorrent's ``smart_ban`` plugin, on by default) remembers which peer sent each
block of a piece that failed its hash; when the piece is later downloaded correctly, peers whose
blocks differed are banned. A peer that alone supplied a failing piece is banned at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import libtorrent as lt

from weightship.errors import TorrentError, TorrentMetadataError, TorrentStalledError
from weightship.manifest import atomic_write
from weightship.progress import Progress
from weightship.torrent.peers import PeerSource, resolve_all
from weightship.torrent.settings import SessionOptions, open_session

log = logging.getLogger(__name__)

REDIAL_EVERY = 5.0  # seconds between re-dialling the known peers (and re-resolving DNS)
REPORT_EVERY = 5.0  # seconds between peers/rates notes
_BLOCK = 16 << 10  # libtorrent's block: the unit of a request, and of a block_finished_alert


class Swarm:
    """One libtorrent session; see the module docstring."""

    def __init__(self, opts: SessionOptions, progress: Progress, peers: PeerSource | None = None) -> None:
        self.session = open_session(opts)
        self.progress = progress
        self.peers = peers or PeerSource()
        self.banned: list[tuple[str, int]] = []
        self.hash_failures = 0
        self._resume_path: Path | None = None
        self.resumed_bytes = 0  # wanted bytes already verified when the download (re)started
        self.downloaded_bytes = 0  # payload bytes that came from peers in this run
        # per file index: [bytes from the origin, bytes from the fleet's peers] (block alerts)
        self.file_traffic: dict[int, list[int]] = {}
        self._fleet_ips: set[str] = set()
        self._ti: lt.torrent_info | None = None
        self._last_dial = 0.0

    # ---- alerts ------------------------------------------------------------------------------

    def poll(self, wait_ms: int = 250) -> list[lt.alert]:
        """Wait up to ``wait_ms`` for alerts, handle the common ones, and return them all."""
        self.session.wait_for_alert(wait_ms)
        alerts: list[lt.alert] = self.session.pop_alerts()
        for a in alerts:
            if isinstance(a, lt.peer_ban_alert):
                endpoint = (str(a.endpoint[0]), int(a.endpoint[1]))
                self.banned.append(endpoint)
                self.progress.note(f"banned peer {endpoint[0]}:{endpoint[1]} (sent data that failed "
                                   "its hash)")
                log.warning("banned peer %s:%s", *endpoint)
            elif isinstance(a, lt.hash_failed_alert):
                self.hash_failures += 1
                log.info("piece %s failed its hash check", a.piece_index)
            elif isinstance(a, lt.block_finished_alert):
                self._count_block(a)
            elif isinstance(a, lt.save_resume_data_alert) and self._resume_path is not None:
                atomic_write(self._resume_path, lt.write_resume_data_buf(a.params))
            elif isinstance(a, (lt.torrent_error_alert, lt.file_error_alert)):
                raise TorrentError(f"libtorrent: {a.message()}")
            elif isinstance(a, lt.listen_failed_alert):
                raise TorrentError(f"cannot listen: {a.message()}",
                                   hint="choose another --listen address or port")
            elif isinstance(a, lt.metadata_failed_alert):
                raise TorrentMetadataError("metadata from peers", a.message())
            elif isinstance(a, (lt.tracker_error_alert, lt.peer_error_alert, lt.fastresume_rejected_alert)):
                log.info("%s", a.message())
        return alerts

    def _count_block(self, a: lt.block_finished_alert) -> None:
        """Count a received block against the files it belongs to, as the fleet's or the origin's
        (a peer is the fleet's when its address is one of --peer / --peers-from-dns: the port of
        a connection it opened to us is not its listening port)."""
        ti = self._ti
        if ti is None:
            return
        start = a.block_index * _BLOCK
        length = min(_BLOCK, ti.piece_size(a.piece_index) - start)
        fleet = str(a.endpoint[0]) in self._fleet_ips
        for part in ti.map_block(a.piece_index, start, length):
            counts = self.file_traffic.setdefault(part.file_index, [0, 0])
            counts[1 if fleet else 0] += part.size

    def dial(self, handle: lt.torrent_handle, *, force: bool = False) -> None:
        """Connect ``handle`` to the known peers (again), at most every :data:`REDIAL_EVERY` s."""
        now = time.monotonic()
        if not force and now - self._last_dial < REDIAL_EVERY:
            return
        self._last_dial = now
        for endpoint in self.peers.endpoints():
            self._fleet_ips |= {ip for ip, _ in resolve_all(*endpoint)} or {endpoint[0]}
            if endpoint not in self.banned:
                handle.connect_peer(endpoint)

    # ---- metadata ----------------------------------------------------------------------------

    def fetch_metadata(self, atp: lt.add_torrent_params, timeout: float) -> lt.torrent_info:
        """Get a magnet link's metadata from peers, downloading nothing else.

        The torrent is added with ``default_dont_download``: every file starts at priority 0, so
        no payload is written before the file names have been checked.
        """
        atp.flags |= lt.torrent_flags.default_dont_download
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        handle = self.session.add_torrent(atp)
        self.dial(handle, force=True)
        deadline = time.monotonic() + timeout
        try:
            while not handle.status().has_metadata:
                if time.monotonic() > deadline:
                    raise TorrentStalledError(
                        f"no peer sent the metadata of {atp.info_hashes.v1} within {timeout:.0f} s",
                        hint="give a seeder with --peer HOST:PORT, --peers-from-dns or --tracker")
                self.poll()
                self.dial(handle)
            info = handle.torrent_file()
            assert info is not None, "has_metadata is set, so the torrent has its info"
        finally:
            self.remove(handle)
        return info

    # ---- download ----------------------------------------------------------------------------

    def download(self, atp: lt.add_torrent_params, labels: dict[int, str], *, stall_timeout: float,
                 resume_path: Path | None, resume_every: float,
                 stop: Callable[[], bool] | None = None) -> lt.torrent_handle:
        """Add ``atp`` and run until every wanted piece is verified; returns the handle.

        ``labels`` maps file indices to the names progress reports them under. Payload that
        stops arriving for ``stall_timeout`` seconds raises :class:`TorrentStalledError`.
        """
        self._resume_path = resume_path
        self._ti = atp.ti
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        handle = self.session.add_torrent(atp)
        try:
            self._run(handle, atp, labels, stall_timeout=stall_timeout, resume_every=resume_every, stop=stop)
        except BaseException:
            # Interrupted, stalled or failed: keep what was verified for the next run.
            with contextlib.suppress(Exception):
                self.save_resume_now(handle)
            raise
        return handle

    def _run(self, handle: lt.torrent_handle, atp: lt.add_torrent_params, labels: dict[int, str], *,
             stall_timeout: float, resume_every: float, stop: Callable[[], bool] | None) -> None:
        resume_path = self._resume_path
        self.dial(handle, force=True)
        reported = dict.fromkeys(labels, 0)
        num_pieces = atp.ti.num_pieces() if atp.ti is not None else 0
        last_payload = time.monotonic()
        last_resume = last_note = time.monotonic()
        last_done = -1
        while True:
            self.poll()
            st = handle.status()
            progress = handle.file_progress()
            for index, label in labels.items():
                delta = progress[index] - reported[index]
                if delta > 0:
                    self.progress.advance(label, delta)
                    reported[index] = progress[index]
            now = time.monotonic()
            if st.total_wanted_done != last_done:
                last_done, last_payload = st.total_wanted_done, now
            if st.state not in (st.checking_files, st.checking_resume_data) and not self.resumed_bytes \
                    and st.total_payload_download == 0:
                self.resumed_bytes = st.total_wanted_done
            self.downloaded_bytes = st.total_payload_download
            if st.is_finished and st.state not in (st.checking_files, st.checking_resume_data):
                break
            if now - last_payload > stall_timeout:
                raise TorrentStalledError(
                    f"no data arrived for {stall_timeout:.0f} s ({st.num_peers} peers connected, "
                    f"{st.total_wanted_done:,} of {st.total_wanted:,} bytes)",
                    hint="check that a seeder is reachable (--peer, --peers-from-dns, --tracker)")
            if resume_path is not None and now - last_resume > resume_every:
                handle.save_resume_data(lt.torrent_handle.only_if_modified)
                last_resume = now
            if now - last_note > REPORT_EVERY:
                self.progress.note(f"{st.num_peers} peers ({st.num_seeds} seeds), "
                                   f"{st.download_payload_rate / 1e6:.1f} MB/s down, "
                                   f"{st.num_pieces}/{num_pieces} pieces")
                last_note = now
            if stop is not None and stop():
                break
            self.dial(handle)

    def save_resume_now(self, handle: lt.torrent_handle, timeout: float = 10.0) -> None:
        """Write fast-resume data for ``handle`` and wait until it is on disk."""
        if self._resume_path is None:
            return
        handle.save_resume_data(lt.torrent_handle.save_info_dict)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(isinstance(a, (lt.save_resume_data_alert, lt.save_resume_data_failed_alert))
                   for a in self.poll(100)):
                return

    def remove(self, handle: lt.torrent_handle, timeout: float = 10.0) -> None:
        """Remove a torrent (keeping its files) and wait until libtorrent has closed them."""
        if not handle.is_valid():
            return
        self.session.remove_torrent(handle)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(TorrentError):
                if any(isinstance(a, lt.torrent_removed_alert) for a in self.poll(100)):
                    return

    def close(self) -> None:
        """Stop the session (closing every connection and file)."""
        self.session.pause()
        del self.session
