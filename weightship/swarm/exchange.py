"""One file's chunks, from peers where they have them and from the origin only where none does.

For each chunk the download asks for (:class:`~weightship.fetch.exchange.ChunkExchange`):

1. a peer that has it (and is up, not banned, and does not vouch for it through a banned node)
   sends it: the one with the fewest of our requests in flight, so the load spreads;
2. else, when a peer has started fetching it from the origin, wait for that peer (while it keeps
   saying something new within the stall time);
3. else the chunk's *owner* fetches it from the origin: the members of the swarm for this file
   (this node, when it serves, and every peer that shares the file) sorted by node id, chunk ``i``
   owned by member ``i mod n``, so the origin's chunks are split between the nodes. A node that
   is not the owner waits while the owner is up and making progress; when the owner is down, has
   stalled, or (views of who is a member differing for a moment) took the chunk from elsewhere,
   the chunk comes from the origin.

Every chunk's sha256 is computed when it arrives and published with it, together with its
*provenance*: the node that fetched it from the origin (or whose whole file verified). A chunk
from a peer must hash to what the provenance node said (as heard from that node itself where it
is a peer of ours); a peer whose bytes are not what it said they were is banned at once. A node
that lies consistently (bytes and digest both wrong) is caught by the file's sha256 at the end:
:meth:`PeerExchange.suspects` then compares one chunk of each provenance node with the origin's
(then, if that finds nothing, every peer-supplied chunk), bans the nodes whose chunks differ, and
names their chunks to fetch again, from the good peers or the origin. Nothing from a peer is
promoted without the file's own size and sha256 matching the trust anchor.

Which node each chunk came from is recorded beside the partial file (``PATH.incomplete.peers``,
one line per chunk, before the journal records the chunk), so a restarted node publishes its
chunks again with their provenance, after checking each against its digest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import urllib3

from weightship.errors import FetchError, PeerError, TransientFetchError
from weightship.fetch.exchange import ChunkExchange, OriginRead, Stopped
from weightship.fetch.http import HttpRemote
from weightship.fetch.journal import provenance_path
from weightship.paths import open_beneath
from weightship.swarm.mesh import Peer
from weightship.swarm.protocol import BLOB_PATH, CHUNK_HEADER, NODE_ID, SHA256, chunks_of

if TYPE_CHECKING:
    from weightship.swarm.node import SwarmNode

log = logging.getLogger(__name__)

ORIGIN = "origin"
GRACE = 1.0  # seconds to wait for an owner that took the chunk from somewhere else
TICK = 0.25  # seconds between looks at the peers while waiting (a change wakes us sooner)
# Seconds a claim on an origin chunk waits for a rival claim: well above the time an event takes
# to reach a peer (a long poll's round trip on a LAN, a few ms), well below a chunk's transfer.
CLAIM_WAIT = 0.1


@dataclass(frozen=True)
class Record:
    """Where one chunk on disk came from."""

    provenance: str  # the node that fetched it from the origin (or verified its whole file)
    digest: str  # the chunk's sha256
    sender: str  # the peer endpoint that sent it, or "origin"


class PeerExchange(ChunkExchange):
    """One file's chunks in the swarm; see the module docstring."""

    def __init__(self, swarm: SwarmNode, sha256: str, size: int, staging: Path, root: Path,
                 path: str) -> None:
        self.swarm, self.sha256, self.size, self.path = swarm, sha256, size, path
        self.staging, self.root = staging, root
        self.mesh, self.board, self.node = swarm.mesh, swarm.board, swarm.node
        self.chunk = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.records: dict[int, Record] = {}
        self.pending: dict[int, Record] = {}
        self.origin_bytes = 0
        self.peer_bytes = 0
        self.from_peers: Counter[str] = Counter()
        self._fd: int | None = None  # read descriptor of the partial (the board owns it)
        self._log: int | None = None  # the provenance file, appended to

    # ---- the download's hooks ---------------------------------------------------------------

    def begin(self, fd: int, size: int, chunk: int, done: set[int], stop: threading.Event) -> set[int]:
        assert size == self.size, (size, self.size)
        self.chunk, self.stop = chunk, stop
        self._fd = os.dup(fd)
        earlier = self._load_records()
        kept = {i: earlier[i] for i in done if i in earlier and self._on_disk(i) == earlier[i].digest}
        with self.lock:
            self.records, self.pending = kept, {}
        self._rewrite_records()
        self.board.share(self.sha256, self.size, chunk, self._fd)
        for i, rec in sorted(kept.items()):
            self.board.have(self.sha256, i, rec.provenance, rec.digest)
        self.mesh.wait_for_contact(self.swarm.opts.first_contact, self.sha256)
        return done - set(kept)

    def fetch(self, index: int, into: memoryview, origin: OriginRead,
              advance: Callable[[int], None]) -> memoryview:
        tried: set[str] = set()
        while True:
            asked = time.monotonic()
            choice = self._choose(index, tried)
            log.debug("%s: chunk %d from %s (decided in %.2f s)", self.path, index,
                      choice[0].name if choice else "the origin", time.monotonic() - asked)
            if choice is None:
                self.board.take(self.sha256, index, origin=True)
                if self._yield_claim(index):
                    continue  # another node claimed it too, and goes first: wait for it
                data = origin(index, into)
                with self.lock:
                    self.pending[index] = Record(self.node, _sha256(data), ORIGIN)
                    self.origin_bytes += len(data)
                return data
            peer, provenance, said = choice
            self.board.take(self.sha256, index, origin=False)
            try:
                claim = self._read(peer, index, into)
            except FetchError as e:
                tried.add(peer.name)
                log.info("%s: chunk %d from %s failed: %s", self.path, index, peer.name, e)
                if isinstance(e, TransientFetchError) and not isinstance(e, PeerError):
                    self.mesh.down(peer, e)
                continue
            finally:
                with self.mesh.cond:
                    peer.inflight -= 1
            got = _sha256(into)
            provenance, said = claim or (provenance, said)  # what it vouched for in the reply
            if got != said:
                self.mesh.ban(peer, f"chunk {index} of {self.path} hashes to {got[:16]}…, "
                                    f"not the {said[:16]}… it vouched for")
                tried.add(peer.name)
                continue
            if provenance in self.mesh.banned or self._provenance_says(provenance, index) not in (None, said):
                tried.add(peer.name)  # not (any more) what the node it came from has
                continue
            with self.lock:
                self.pending[index] = Record(provenance, got, peer.name)
                self.peer_bytes += len(into)
                self.from_peers[peer.name] += len(into)
            advance(len(into))
            return into

    def written(self, index: int) -> None:
        with self.lock:
            rec = self.pending.pop(index)
            self.records[index] = rec
        self._append_record(index, rec)
        self.board.have(self.sha256, index, rec.provenance, rec.digest)

    def suspects(self, origin: OriginRead) -> set[int] | None:
        with self.lock:
            records = dict(self.records)
        # Bytes on disk that are not what arrived (a torn write), and chunks vouched for by a
        # node banned since: fetched again without asking the origin anything.
        redo = {i for i, rec in records.items()
                if rec.provenance in self.mesh.banned or rec.sender in self.mesh.banned
                or self._on_disk(i) != rec.digest}
        if not redo:
            caught = self._compare_with_origin(records, origin)
            if caught is None:
                return None
            redo = caught
        with self.lock:
            for i in redo:
                self.records.pop(i, None)
        self.board.drop(self.sha256, redo)
        self._rewrite_records()
        return redo

    def end(self, verified: bool) -> None:
        if verified:
            self.board.done(self.sha256)
            provenance_path(self.staging).unlink(missing_ok=True)
        else:
            self.board.unshare(self.sha256)
        if self._log is not None:
            os.close(self._log)
            self._log = None

    # ---- choosing where a chunk comes from ---------------------------------------------------

    def _choose(self, index: int, tried: set[str]) -> tuple[Peer, str, str] | None:
        """A peer to take chunk ``index`` from (with the provenance and digest it published),
        or None for the origin; waits as the module docstring says."""
        odd_since: float | None = None
        cond = self.mesh.cond
        with cond:
            while True:
                if self.stop.is_set():
                    raise Stopped()
                now = time.monotonic()
                holders: list[tuple[Peer, tuple[str, str]]] = []
                fetching = False
                members = {self.node} if self.swarm.serving else set()
                owners: dict[str, Peer] = {}
                for p in self.mesh.usable():
                    rf = p.files.get(self.sha256)
                    if rf is None or (rf.size, rf.chunk) != (self.size, self.chunk):
                        continue
                    assert p.node is not None
                    members.add(p.node)
                    owners.setdefault(p.node, p)
                    got = rf.have.get(index)
                    if got is not None:
                        if p.name not in tried and got[0] not in self.mesh.banned:
                            holders.append((p, got))
                    elif rf.taken.get(index) and now - p.last_event < self.swarm.opts.stall:
                        fetching = True
                if holders:
                    p, (provenance, digest) = min(holders, key=lambda h: (h[0].inflight, random.random()))
                    p.inflight += 1
                    return p, provenance, digest
                if not fetching:
                    owner = sorted(members)[index % len(members)] if members else None
                    if owner is None or owner == self.node:
                        return None
                    op = owners[owner]
                    rf = op.files[self.sha256]
                    held = rf.have.get(index)
                    if op.name in tried or (held is not None and held[0] not in self.mesh.banned):
                        return None  # it has it, but not for us
                    if held is not None:  # vouched for by a node we banned: the owner will find
                        if now - op.last_event > self.swarm.opts.stall:  # out and fetch it again
                            return None
                    elif index in rf.taken:  # it is getting it from elsewhere: views differ
                        odd_since = odd_since or now
                        if now - odd_since > GRACE:
                            return None
                    elif now - op.last_event > self.swarm.opts.stall:
                        return None  # the owner is up but stuck
                cond.wait(TICK)

    def _yield_claim(self, index: int) -> bool:
        """After announcing that this node takes chunk ``index`` from the origin, whether to let
        another node have it: two nodes whose views of the members differed for a moment (one
        just joined) may both think they own it. Each waits :data:`CLAIM_WAIT` for the other's
        claim to arrive, and the smaller node id goes first."""
        deadline = time.monotonic() + CLAIM_WAIT
        cond = self.mesh.cond
        with cond:
            while (left := deadline - time.monotonic()) > 0:
                cond.wait(left)
            for p in self.mesh.usable():
                rf = p.files.get(self.sha256)
                if rf is None or (rf.size, rf.chunk) != (self.size, self.chunk):
                    continue
                held = rf.have.get(index)
                if (held is not None and held[0] not in self.mesh.banned) or (
                        held is None and rf.taken.get(index) and p.node is not None and p.node < self.node):
                    return True
        return False

    def _provenance_says(self, provenance: str, index: int) -> str | None:
        """The digest the provenance node itself publishes for chunk ``index``, if we hear it."""
        with self.mesh.cond:
            for p in self.mesh.usable():
                rf = p.files.get(self.sha256)
                if p.node == provenance and rf is not None and rf.chunk == self.chunk:
                    got = rf.have.get(index)
                    return got[1] if got is not None else None
        return None

    def _read(self, peer: Peer, index: int, into: memoryview) -> tuple[str, str] | None:
        """Chunk ``index`` from ``peer`` into ``into``; the (provenance, digest) its reply
        vouched for."""
        start = index * self.chunk
        remote = _PeerRemote(self.swarm.peer_pool, f"{peer.url}{BLOB_PATH}{self.sha256}",
                             where=f"peer {peer.name}")
        pos = 0
        for view in remote.read_range(start, start + len(into), None, into):
            pos += len(view)
            if self.stop.is_set():
                raise Stopped()
        if pos != len(into):
            raise PeerError(peer.name, f"chunk {index} ended at byte {pos} of {len(into)}")
        return remote.claim

    # ---- after a digest mismatch ---------------------------------------------------------------

    def _compare_with_origin(self, records: dict[int, Record], origin: OriginRead) -> set[int] | None:
        """The other chunks of the first provenance node found with a chunk that differs from the
        origin's (banned): one chunk of each node first, then every one; None when none differs.
        The origin's chunk replaces the one on disk, so it is not fetched again."""
        by_node: dict[str, list[int]] = defaultdict(list)
        for i, rec in sorted(records.items()):
            if rec.provenance != self.node:
                by_node[rec.provenance].append(i)
        redo: set[int] | None = None
        buf = memoryview(bytearray(self.chunk))
        checked: set[int] = set()
        # the nodes that vouched for most of the file first; the first one caught ends the search
        # (if the file still does not match, the next call goes on with the others)
        suspects = sorted(by_node.items(), key=lambda kv: -len(kv[1]))
        for sample in (True, False):
            for node, indices in suspects:
                if redo is not None:
                    break
                for i in ([random.choice(indices)] if sample else indices):
                    if i in checked:
                        continue
                    checked.add(i)
                    theirs = origin(i, buf[:self._chunk_len(i)])
                    with self.lock:
                        self.origin_bytes += len(theirs)
                    digest = _sha256(theirs)
                    if digest != records[i].digest:
                        self.mesh.ban_node(node, f"its chunk {i} of {self.path} is not the origin's")
                        self._replace(i, theirs, digest)
                        redo = {j for j in indices if j != i}
                        break
            if redo is not None:
                break
        return redo

    def _replace(self, index: int, data: memoryview, digest: str) -> None:
        """Write the origin's bytes of chunk ``index`` over the ones on disk (no reply reading
        them meanwhile), and say so."""
        fd = self._fd
        assert fd is not None

        def write() -> None:
            view, offset = data, index * self.chunk
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n

        self.board.rewrite(self.sha256, index, write)
        rec = Record(self.node, digest, ORIGIN)
        with self.lock:
            self.records[index] = rec
        self._append_record(index, rec)
        self.board.have(self.sha256, index, rec.provenance, rec.digest)

    # ---- the provenance file ---------------------------------------------------------------

    def _chunk_len(self, i: int) -> int:
        return min((i + 1) * self.chunk, self.size) - i * self.chunk

    def _on_disk(self, i: int) -> str | None:
        assert self._fd is not None
        want = self._chunk_len(i)
        data = os.pread(self._fd, want, i * self.chunk)
        return _sha256(data) if len(data) == want else None

    def _load_records(self) -> dict[int, Record]:
        try:
            text = provenance_path(self.staging).read_text()
        except (OSError, UnicodeDecodeError):
            return {}
        found: dict[int, Record] = {}
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) == 4 and parts[0].isdigit() and NODE_ID.match(parts[1]) and SHA256.match(parts[2]):
                i = int(parts[0])
                if i < chunks_of(self.size, self.chunk):
                    found[i] = Record(parts[1], parts[2], parts[3])
        return found

    def _open_log(self, flags: int) -> int:
        rel = provenance_path(self.staging).relative_to(self.root)
        return open_beneath(self.root, rel, os.O_WRONLY | os.O_CREAT | flags, 0o644)

    def _append_record(self, index: int, rec: Record) -> None:
        with self.lock:
            if self._log is None:
                self._log = self._open_log(os.O_APPEND)
            os.write(self._log, f"{index} {rec.provenance} {rec.digest} {rec.sender}\n".encode())

    def _rewrite_records(self) -> None:
        with self.lock:
            if self._log is not None:
                os.close(self._log)
            lines = "".join(f"{i} {r.provenance} {r.digest} {r.sender}\n" for i, r in sorted(self.records.items()))
            self._log = self._open_log(os.O_TRUNC | os.O_APPEND)
            os.write(self._log, lines.encode())


class _PeerRemote(HttpRemote):
    """A peer's blob: an HTTP range reader that keeps what the reply vouched for."""

    claim: tuple[str, str] | None = None

    def _check_range_reply(self, r: urllib3.BaseHTTPResponse, start: int, end: int,
                           validator: str | None) -> None:
        super()._check_range_reply(r, start, end, validator)
        prov, _, digest = (r.headers.get(CHUNK_HEADER) or "").partition(" ")
        self.claim = (prov, digest) if NODE_ID.match(prov) and SHA256.match(digest) else None


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
