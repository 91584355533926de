"""A fetch's place in the fleet swarm: its id, its peer server, its view of the peers.

One :class:`SwarmNode` per fetch that was given peers (``--listen``, ``--peer``,
``--peers-from-dns``). The engine asks it for a :class:`~weightship.swarm.exchange.PeerExchange`
per file it downloads, registers the files it already has (verified), and after the fetch lets
it serve for ``--seed-for`` (ending early once every peer it knows has verified every file).

A node's id is random, kept in ``DIR/.weightship/swarm-node`` so that a restarted fetch keeps it
(chunks it fetched from the origin before the restart are still known by it). A node with no
``--listen`` only takes: it is not a member of the swarm, owns no chunks, and fetches from the
origin what no member has or is fetching.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from weightship.fetch.base import PlannedFile
from weightship.fetch.options import PeerOptions, TransferOptions
from weightship.fetch.transport import HttpPool
from weightship.paths import open_beneath
from weightship.progress import Progress
from weightship.swarm.board import Board
from weightship.swarm.exchange import PeerExchange
from weightship.swarm.mesh import Mesh
from weightship.swarm.protocol import NODE_ID, chunk_digest, chunks_of
from weightship.swarm.server import PeerServer
from weightship.torrent.peers import DEFAULT_PORT, PeerSource, parse_endpoint

log = logging.getLogger(__name__)

NODE_FILE = "swarm-node"
GIVE_UP = 60.0  # seconds: a peer that has not answered this long is not waited for (serving ends)


@dataclass
class FileTraffic:
    """Where one file's bytes came from in this run."""

    origin: int = 0
    peers: int = 0
    from_peers: Counter[str] = field(default_factory=Counter)


class SwarmNode:
    """See the module docstring."""

    def __init__(self, opts: PeerOptions, state_dir: Path, transfer: TransferOptions) -> None:
        self.opts = opts
        self.node = _node_id(state_dir)
        self.chunk = transfer.chunk_size
        self.board = Board(self.node)
        self.server: PeerServer | None = None
        self.exchanges: list[tuple[str, PeerExchange]] = []
        # Chunks fetched ahead from the origin, one at a time per node: with fewer streams at the
        # origin each chunk arrives sooner, and is passed on sooner.
        self.ahead_slot = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.peer_pool = HttpPool(TransferOptions(
            connections=transfer.connections, parallel_files=transfer.parallel_files,
            chunk_size=transfer.chunk_size, stall_timeout=opts.stall), proxies=False)
        if opts.listen is not None:
            self.server = PeerServer(self.board, *listen_address(opts.listen)).start()
        self.mesh = Mesh(self.node, PeerSource.from_options(opts.peers, opts.peers_from_dns)).start()
        log.info("swarm node %s%s, peers %s", self.node,
                 f" serving on port {self.server.port}" if self.server else " (not serving)",
                 ", ".join(opts.peers) or opts.peers_from_dns or "none yet")

    @property
    def serving(self) -> bool:
        """Whether peers can take chunks from this node (it listens)."""
        return self.server is not None

    def exchange_for(self, f: PlannedFile, staging: Path, root: Path) -> PeerExchange | None:
        """The exchange for downloading ``f`` into ``staging``; None for a file with no trusted
        sha256 and size (the Hub's small git files), which come from the origin."""
        if f.sha256 is None or f.size is None:
            return None
        ex = PeerExchange(self, f.sha256, f.size, staging, root, f.path)
        self.exchanges.append((f.path, ex))
        return ex

    def share_verified(self, f: PlannedFile, path: Path, root: Path) -> None:
        """Serve ``f``, already on disk at ``path``: its chunks' digests (and its whole sha256,
        once more, through the descriptor that will serve it) are computed in the background,
        and it is published when they match."""
        if not self.serving or f.sha256 is None or f.size is None:
            return
        fd = open_beneath(root, path.relative_to(root), os.O_RDONLY)
        t = threading.Thread(target=self._publish, args=(f, fd), name="ws-swarm-share", daemon=True)
        self._threads.append(t)
        t.start()

    def _publish(self, f: PlannedFile, fd: int) -> None:
        assert f.sha256 is not None and f.size is not None
        whole = hashlib.sha256()
        digests = []
        try:
            for i in range(chunks_of(f.size, self.chunk)):
                data = os.pread(fd, min(self.chunk, f.size - i * self.chunk), i * self.chunk)
                whole.update(data)
                digests.append(chunk_digest(data))
                if self.board.closed:
                    raise OSError("stopped")
        except OSError as e:
            log.info("%s: not shared: %s", f.path, e)
            os.close(fd)
            return
        if whole.hexdigest() != f.sha256 or os.fstat(fd).st_size != f.size:
            log.warning("%s changed since it was verified; not shared", f.path)
            os.close(fd)
            return
        self.board.share(f.sha256, f.size, self.chunk, fd)
        for i, d in enumerate(digests):
            self.board.have(f.sha256, i, self.node, d)
        self.board.done(f.sha256)

    def wait_shared(self) -> None:
        """Wait until the files given to :meth:`share_verified` are published (or refused)."""
        for t in self._threads:
            t.join()

    def traffic(self) -> dict[str, FileTraffic]:
        """Per file path: bytes from the origin and from peers (by peer) in this run."""
        out: dict[str, FileTraffic] = {}
        for path, ex in self.exchanges:
            t = out.setdefault(path, FileTraffic())
            with ex.lock:
                t.origin += ex.origin_bytes
                t.peers += ex.peer_bytes
                t.from_peers.update(ex.from_peers)
        return out

    def uploaded(self) -> int:
        """Bytes this node has served to peers."""
        return self.board.sent()

    def banned(self) -> dict[str, str]:
        """Peers (endpoints and node ids) banned, and why."""
        with self.mesh.cond:
            return dict(self.mesh.banned)

    def linger(self, progress: Progress) -> None:
        """Serve for ``seed_for`` seconds, ending early when every peer this node knows of has
        verified every file it shares, or has not answered for :data:`GIVE_UP` seconds (with no
        peer known, the whole time)."""
        seconds = self.opts.seed_for
        if seconds <= 0 or not self.serving:
            return
        self.wait_shared()
        with self.board.cond:
            digests = {sha for sha, f in self.board.files.items() if f.done}
        progress.note(f"serving {len(digests)} files to peers"
                      + (f" for up to {seconds:.0f} s" if seconds != float("inf") else "")
                      + " (until every peer has them)" * (seconds != float("inf")))
        deadline = time.monotonic() + seconds
        waiting = ["?"]
        while time.monotonic() < deadline:
            waiting = self.mesh.not_done(digests, give_up=GIVE_UP)
            if seconds != float("inf") and self.mesh.peers and not waiting:
                # before going, let every peer read that this node is done too: a peer that
                # never hears it would wait for this node until its own --seed-for ends
                self.board.wait_seen(self.mesh.nodes(), timeout=min(5.0, max(0.0, deadline - time.monotonic())))
                log.info("every peer has verified the model; no longer serving")
                return
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        log.info("stopped serving; peers still without the whole model: %s", ", ".join(waiting))

    def close(self) -> None:
        """Stop serving and reading peers."""
        self.board.close()
        if self.server is not None:
            self.server.stop()
        self.mesh.close()
        self.peer_pool.close()


def listen_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` to listen on (port 0: any free port; no port: 6881)."""
    host, sep, port = text.rpartition(":")
    if sep and port == "0" and host:
        return host.strip("[]"), 0
    host, number = parse_endpoint(text, default_port=DEFAULT_PORT)
    return host.strip("[]"), number


def _node_id(state_dir: Path) -> str:
    """This directory's swarm node id: kept across restarts of a fetch into it."""
    root = state_dir.parent
    rel = state_dir.relative_to(root) / NODE_FILE
    try:
        fd = open_beneath(root, rel, os.O_RDONLY)
        with os.fdopen(fd) as f:
            found = f.read(100).strip()
        if NODE_ID.match(found):
            return found
    except (OSError, UnicodeDecodeError):
        pass
    node = secrets.token_hex(8)
    try:
        fd = open_beneath(root, rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, create_parents=True)
    except OSError as e:  # a read-only model directory (a seeder's mount): an id for this run
        log.debug("cannot keep the swarm node id in %s: %s", state_dir, e)
        return node
    with os.fdopen(fd, "w") as f:
        f.write(node + "\n")
    return node
