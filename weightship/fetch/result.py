"""What a fetch did: the manifest it wrote, the files it fetched or kept, and where the bytes
came from (counted from the threads that fetch files in parallel)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from weightship.manifest import Manifest

_COUNTERS = threading.Lock()


@dataclass
class FetchResult:
    """What a fetch did."""

    directory: Path
    manifest: Manifest
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0  # bytes that came over the network in this run
    resumed_bytes: int = 0  # bytes of partial downloads from earlier runs, reused
    # Where this run's bytes came from, per file path: {"origin": n, "peers": n}. The origin is
    # the source (Hub, S3, web server, or for a torrent the peers that are not --peer/DNS ones);
    # peers are the fleet's (--peer, --peers-from-dns).
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)
    from_peers: dict[str, int] = field(default_factory=dict)  # bytes per peer endpoint
    uploaded_bytes: int = 0  # bytes this node served to peers
    banned_peers: dict[str, str] = field(default_factory=dict)  # peer -> why

    @property
    def origin_bytes(self) -> int:
        """Bytes this run took from the origin."""
        return sum(t["origin"] for t in self.traffic.values())

    @property
    def peer_bytes(self) -> int:
        """Bytes this run took from fleet peers."""
        return sum(t["peers"] for t in self.traffic.values())

    def add(self, path: str, fetched: int, resumed: int = 0, *, from_origin: bool = True) -> None:
        """Count ``path``'s bytes: ``fetched`` over the network in this run (from the origin,
        unless the swarm counts them itself), ``resumed`` reused from an earlier run's partial."""
        with _COUNTERS:
            self.downloaded_bytes += fetched
            self.resumed_bytes += resumed
        if from_origin:
            self.count(path, origin=fetched)

    def count(self, path: str, *, origin: int = 0, peers: int = 0) -> None:
        """Add to ``path``'s traffic (files finish in parallel threads)."""
        with _COUNTERS:
            t = self.traffic.setdefault(path, {"origin": 0, "peers": 0})
            t["origin"] += origin
            t["peers"] += peers
