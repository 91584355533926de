"""``weightship seed`` for the fleet swarm: a verified directory's files served to peers.

Fetches from the Hub, S3 or a web server given peers speak the swarm's protocol
(:mod:`weightship.swarm.protocol`), not BitTorrent; a seeder for them (the Helm chart's P2P
DaemonSet, or a node that keeps serving) serves each file of the directory's manifest by its
sha256. Each file is read once through the descriptor that will serve it: its chunks' digests
are computed and its whole sha256 is compared with the manifest's first, so a damaged file is
never served (the seeder refuses to start, naming it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weightship.errors import SwarmError
from weightship.fetch.base import PlannedFile
from weightship.fetch.options import SWARM_CHUNK, PeerOptions, TransferOptions
from weightship.manifest import Manifest
from weightship.paths import STATE_DIR, PathsUnder
from weightship.swarm.node import SwarmNode, listen_address


@dataclass(frozen=True)
class SwarmSeeding:
    """What a running swarm seeder announces about itself."""

    node: str
    listen: str
    files: int

    def to_dict(self) -> dict[str, object]:
        return {"event": "seeding", "protocol": "swarm", "node": self.node, "listen": [self.listen],
                "files": self.files}


def seed_swarm(directory: Path, *, listen: str, peers: tuple[str, ...] = (), peers_from_dns: str | None = None,
               duration: float = float("inf"), chunk_size: int = SWARM_CHUNK,
               on_ready: Callable[[SwarmSeeding], None] | None = None,
               stop: Callable[[], bool] | None = None) -> int:
    """Serve ``directory``'s files to swarm peers for ``duration`` seconds; returns the bytes
    served."""
    manifest = Manifest.load(directory)
    host = listen_address(listen)[0]  # also refuses a malformed address before anything starts
    opts = PeerOptions(listen=listen, peers=peers, peers_from_dns=peers_from_dns, seed_for=duration)
    node = SwarmNode(opts, directory / STATE_DIR, TransferOptions(chunk_size=chunk_size))
    try:
        under = PathsUnder(directory)
        for f in manifest.files:
            node.share_verified(PlannedFile(path=f.path, size=f.size, sha256=f.sha256),
                                under.resolve(f.path), directory)
        node.wait_shared()
        with node.board.cond:
            shared = {sha for sha, s in node.board.files.items() if s.done}
        missing = [f.path for f in manifest.files if f.sha256 not in shared]
        if missing:
            raise SwarmError(f"{directory}: {', '.join(missing[:5])} do not match the manifest; not seeding",
                             hint="run `weightship verify` and fetch the damaged files again")
        assert node.server is not None
        if on_ready is not None:
            on_ready(SwarmSeeding(node.node, f"{host}:{node.server.port}", len(manifest.files)))
        end = time.monotonic() + duration
        while time.monotonic() < end and not (stop is not None and stop()):
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        return node.uploaded()
    finally:
        node.close()
