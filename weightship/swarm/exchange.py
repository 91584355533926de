"""One file's chunks, from peers where they have them and from the origin only where none does.

(Over 400 lines, on purpose: one class whose methods all read and change the same chunk state
under the mesh's lock; the decisions are small named methods, the rest is this docstring.)

The origin's chunks are split between the *members* of the swarm for this file (this node, when
it serves, and every peer that shares the file), sorted by node id: chunk ``i`` is owned by
member ``i mod n``. Each member fetches the chunks it owns from the origin *ahead* of its own
download, straight to its partial file, so they are ready for the others when they need them
and the origin's link never waits for a node's hashing to catch up (the download hashes in
order, with a few chunks in memory; measured on 8 shaped nodes, fetching owned chunks only as
the download reached them left the origin idle between rounds: 1.7x one node's time instead
of about 1x). A member fetches from the origin one chunk at a time per file.

For each chunk the download asks for (:class:`~weightship.fetch.exchange.ChunkExchange`):

1. when it is on disk already (fetched ahead), it is read back;
2. a peer that has it (up, not banned, not vouching for it through a banned node) sends it: the
   one with the fewest of our requests in flight, so the load spreads;
3. else, when a peer is fetching it from the origin, wait for that peer (while it keeps saying
   something new within the stall time);
4. else its owner will: wait while the owner is up and making progress; when the owner is down,
   has stalled, or (views of the members differing for a moment) took it from elsewhere, or this
   node is the owner, the chunk comes from the origin. Before an origin fetch a node announces
   it and waits :data:`CLAIM_WAIT` for a rival claim; the smaller node id goes first.

Beside the download, which asks for chunks in order (its sha256 is computed in order, with a
few chunks in memory), :data:`RARE_STREAMS` readers per file take from peers, into the partial
file, the chunks the fewest peers hold (ties at random); the download then reads those back.
Nodes that all download in the same order hold the same chunks and have little to give each
other, and all ask a fresh chunk's one holder at once: measured on 8 nodes with 100 Mbit/s links
(where the CPU is not the limit), a rollout took 61-71 s without these readers, 58-61 s with them.

Every chunk's digest is computed when it arrives and published with it, with its *provenance*:
the node that fetched it from the origin (or whose whole file verified). A chunk from a peer
must hash to what that peer vouched for in its reply, and agree with what the provenance node
publishes; a peer whose bytes contradict its own reply is banned at once. A node that lies
consistently (bytes and digest both wrong) is caught by the file's sha256 at the end
(:mod:`.repair`). Nothing from a peer is promoted unless the whole file's size and sha256 match
the trust anchor. Each chunk's provenance is kept beside the partial file (:mod:`.records`).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import urllib3

from weightship.errors import FetchError, PeerError, TransientFetchError
from weightship.fetch.chunkfile import pwrite_all
from weightship.fetch.exchange import ChunkExchange, OriginRead, Stopped
from weightship.fetch.transport import HttpRemote
from weightship.swarm import repair
from weightship.swarm.mesh import Peer, RemoteFile
from weightship.swarm.protocol import BLOB_PATH, CHUNK_HEADER, NODE_ID, SHA256, chunk_digest, chunks_of
from weightship.swarm.records import ORIGIN, ProvenanceLog, Record

if TYPE_CHECKING:
    from weightship.swarm.node import SwarmNode

log = logging.getLogger(__name__)

GRACE = 1.0  # seconds to wait for an owner that took the chunk from somewhere else
TICK = 0.25  # seconds between looks at the peers while waiting (a change wakes us sooner)
# Seconds a claim on an origin chunk waits for a rival claim: well above the time an event takes
# to reach a peer (a long poll's round trip on a LAN, a few ms), well below a chunk's transfer.
CLAIM_WAIT = 0.1
RARE_STREAMS = 2  # per file: chunks taken from peers rarest first, beside the download's own
# Missing chunks (the lowest) among which they choose: a pick looks at each chunk's holders (not
# at all 2,400 chunks of a 10 GB file each time), and the download reaches what they take soon.
RARE_WINDOW = 64


class PeerExchange(ChunkExchange):
    """One file's chunks in the swarm; see the module docstring."""

    def __init__(self, swarm: SwarmNode, sha256: str, size: int, staging: Path, root: Path,
                 path: str) -> None:
        self.swarm, self.sha256, self.size, self.path = swarm, sha256, size, path
        self.mesh, self.board, self.node = swarm.mesh, swarm.board, swarm.node
        self.chunk = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.local = threading.Condition(self.lock)  # records, pending, ahead, busy changed
        self.records: dict[int, Record] = {}  # chunks on disk
        self.pending: dict[int, Record] = {}  # chunks handed to the download, not written yet
        self.ahead: set[int] = set()  # chunks being fetched ahead from the origin
        self.busy: set[int] = set()  # chunks the download is fetching
        self.origin_bytes = 0
        self.peer_bytes = 0
        self.from_peers: Counter[str] = Counter()
        self.read_fd: int | None = None  # the partial file (the board owns it)
        self.staging = staging  # the partial file
        self.log = ProvenanceLog(staging, root)
        self._halt = threading.Event()  # stops the current fetching ahead

    # ---- the download's hooks ---------------------------------------------------------------

    def begin(self, fd: int, size: int, chunk: int, done: set[int], stop: threading.Event,
              origin: OriginRead) -> set[int]:
        assert size == self.size, (size, self.size)
        self._halt.set()  # a resumed download (after a repair) starts its own
        self.chunk, self.stop = chunk, stop
        self.read_fd = os.dup(fd)
        earlier = self.log.load(chunks_of(size, chunk))
        kept = {i: earlier[i] for i in done if i in earlier and self.on_disk(i) == earlier[i].digest}
        with self.lock:
            self.records, self.pending, self.ahead, self.busy = dict(kept), {}, set(), set()
        self.log.rewrite(kept)
        self.board.share(self.sha256, self.size, chunk, self.read_fd)
        for i, rec in sorted(kept.items()):
            self.board.have(self.sha256, i, rec.provenance, rec.digest)
        self.mesh.wait_for_contact(self.swarm.opts.wait, self.sha256)
        self._halt = threading.Event()
        if self.swarm.serving:
            threading.Thread(target=self._run_ahead, args=(origin, self._halt, os.dup(fd)),
                             name="ws-ahead", daemon=True).start()
        for _ in range(RARE_STREAMS):
            threading.Thread(target=self._run_rare, args=(self._halt, os.dup(fd)),
                             name="ws-rare", daemon=True).start()
        return done - set(kept)

    def fetch(self, index: int, into: memoryview, origin: OriginRead,
              advance: Callable[[int], None]) -> memoryview:
        with self.local:
            while index in self.ahead:  # being fetched ahead: wait for it
                if self.stop.is_set():
                    raise Stopped()
                self.local.wait(TICK)
            rec = self.records.get(index)
            if rec is not None:
                self.pending[index] = rec
            else:
                self.busy.add(index)
        if rec is not None:
            assert self.read_fd is not None
            os.preadv(self.read_fd, [into], index * self.chunk)
            return into
        try:
            return self._fetch(index, into, origin, advance)
        finally:
            with self.local:
                self.busy.discard(index)

    def stored(self, index: int) -> bool:
        with self.lock:  # fetched ahead (or kept from an earlier run): read back from the file
            return index in self.records and self.records[index] == self.pending.get(index)

    def written(self, index: int) -> None:
        with self.lock:
            rec = self.pending.pop(index)
            fresh = self.records.get(index) != rec
            self.records[index] = rec
        if fresh:
            self.log.append(index, rec)
            self.board.have(self.sha256, index, rec.provenance, rec.digest)

    def suspects(self, origin: OriginRead) -> set[int] | None:
        return repair.suspects(self, origin)

    def end(self, verified: bool) -> None:
        self._halt.set()
        if verified:
            self.board.done(self.sha256)
        else:
            self.board.unshare(self.sha256)
        self.log.close(remove=verified)

    # ---- what the repair uses ----------------------------------------------------------------

    def chunk_len(self, i: int) -> int:
        return min((i + 1) * self.chunk, self.size) - i * self.chunk

    def on_disk(self, i: int) -> str | None:
        """The digest of chunk ``i`` as it is on disk now (None when the file is short)."""
        assert self.read_fd is not None
        want = self.chunk_len(i)
        data = os.pread(self.read_fd, want, i * self.chunk)
        return chunk_digest(data) if len(data) == want else None

    def keep(self, index: int, rec: Record) -> None:
        """Chunk ``index`` is on disk as ``rec`` says: record and publish it."""
        self._landed(index, rec)

    def _landed(self, index: int, rec: Record | None) -> None:
        """Chunk ``index`` is on disk as ``rec`` says (None: it did not arrive) and is no longer
        fetched ahead: recorded before the download stops waiting for it (so no one fetches it
        twice), then published."""
        with self.local:
            if rec is not None:
                self.records[index] = rec
            self.ahead.discard(index)
            self.local.notify_all()
        if rec is not None:
            self.log.append(index, rec)
            self.board.have(self.sha256, index, rec.provenance, rec.digest)

    def forget(self, chunks: set[int]) -> None:
        """These chunks are to be fetched again."""
        with self.lock:
            for i in chunks:
                self.records.pop(i, None)
            records = dict(self.records)
        self.board.drop(self.sha256, chunks)
        self.log.rewrite(records)

    # ---- one chunk, from a peer or the origin -------------------------------------------------

    def _fetch(self, index: int, into: memoryview, origin: OriginRead,
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
                    self.pending[index] = Record(self.node, chunk_digest(data), ORIGIN)
                    self.origin_bytes += len(data)
                return data
            rec = self._from_peer(*choice, index, into)
            if rec is None:
                tried.add(choice[0].name)
                continue
            with self.lock:
                self.pending[index] = rec
            advance(len(into))
            return into

    def _from_peer(self, peer: Peer, provenance: str, said: str, index: int, into: memoryview) -> Record | None:
        """Chunk ``index`` from ``peer`` (chosen with ``peer.inflight`` counted) into ``into``,
        checked against what the peer vouched for; None when it failed or did not match (the
        peer is then marked down or banned as it deserves)."""
        self.board.take(self.sha256, index, origin=False)
        try:
            claim = self._read(peer, index, into)
        except FetchError as e:
            log.info("%s: chunk %d from %s failed: %s", self.path, index, peer.name, e)
            if isinstance(e, TransientFetchError) and not isinstance(e, PeerError):
                self.mesh.down(peer, e)
            return None
        finally:
            with self.mesh.cond:
                peer.inflight -= 1
        got = chunk_digest(into)
        provenance, said = claim or (provenance, said)  # what it vouched for in the reply
        if got != said:
            self.mesh.ban(peer, f"chunk {index} of {self.path} hashes to {got[:16]}…, "
                                f"not the {said[:16]}… it vouched for")
            return None
        if provenance in self.mesh.banned or self._provenance_says(provenance, index) not in (None, said):
            return None  # not (any more) what the node it came from has
        with self.lock:
            self.peer_bytes += len(into)
            self.from_peers[peer.name] += len(into)
        return Record(provenance, got, peer.name)

    def view(self) -> tuple[list[str], dict[str, tuple[Peer, RemoteFile]]]:
        """The members for this file, sorted, and each peer member's state (call with the
        mesh's condition held)."""
        members = {self.node} if self.swarm.serving else set()
        peers: dict[str, tuple[Peer, RemoteFile]] = {}
        for p in self.mesh.usable():
            rf = p.files.get(self.sha256)
            if rf is not None and (rf.size, rf.chunk) == (self.size, self.chunk) and p.node is not None:
                members.add(p.node)
                peers.setdefault(p.node, (p, rf))
        return sorted(members), peers

    def _choose(self, index: int, tried: set[str]) -> tuple[Peer, str, str] | None:
        """A peer to take chunk ``index`` from (with the provenance and digest it published),
        or None for the origin; waits as the module docstring says."""
        odd_since: float | None = None
        with self.mesh.cond:
            while True:
                if self.stop.is_set():
                    raise Stopped()
                now = time.monotonic()
                holders, fetching = self._holders(index, tried, now)
                if holders:
                    p, (provenance, digest) = _least_asked(holders)
                    return p, provenance, digest
                if not fetching:
                    origin, odd_since = self._origin_now(index, tried, now, odd_since)
                    if origin:
                        return None
                self.mesh.wait_chunk(self.sha256, index, TICK)

    def _holders(self, index: int, tried: set[str],
                 now: float) -> tuple[list[tuple[Peer, tuple[str, str]]], bool]:
        """The peers that hold chunk ``index`` and may be asked for it (not tried yet, not vouched
        for by a banned node), and whether a live peer is fetching it now (call with the mesh's
        condition held)."""
        holders: list[tuple[Peer, tuple[str, str]]] = []
        fetching = False
        for p in self.mesh.usable():
            rf = p.files.get(self.sha256)
            if rf is None or (rf.size, rf.chunk) != (self.size, self.chunk):
                continue
            got = rf.have.get(index)
            if got is not None:
                if p.name not in tried and got[0] not in self.mesh.banned:
                    holders.append((p, got))
            elif rf.taken.get(index) and now - p.last_event < self.swarm.opts.stall:
                fetching = True
        return holders, fetching

    def _origin_now(self, index: int, tried: set[str], now: float,
                    odd_since: float | None) -> tuple[bool, float | None]:
        """Whether to take chunk ``index`` from the origin now, when no peer holds it for us and
        none is fetching it: yes when this node owns it (or no member does), or when its owner
        will not deliver (it holds it but not for us, it is stuck, or the views of who owns it
        have differed for longer than :data:`GRACE`); else wait. Also returns since when the
        views have differed (call with the mesh's condition held)."""
        members, peers = self.view()
        owner = members[index % len(members)] if members else None
        if owner is None or owner == self.node:
            return True, odd_since
        op, rf = peers[owner]
        held = rf.have.get(index)
        stall, banned = self.swarm.opts.stall, self.mesh.banned
        if op.name in tried or (held is not None and held[0] not in banned):
            return True, odd_since  # it has it, but not for us
        if held is not None:  # vouched for by a node we banned: the owner will find out and
            return now - op.last_event > stall, odd_since  # fetch it again, unless it is stuck
        if index in rf.taken:  # it is getting it from elsewhere: views differ
            odd_since = odd_since or now
            return now - odd_since > GRACE, odd_since
        return now - op.last_event > stall, odd_since  # the owner is up but stuck

    def _yield_claim(self, index: int, claimed_at: float | None = None) -> bool:
        """After announcing (at ``claimed_at``; default now) that this node takes chunk ``index``
        from the origin, whether to let another node have it: two nodes whose views of the
        members differed for a moment (one just joined) may both think they own it. Each waits
        :data:`CLAIM_WAIT` for the other's claim to arrive, and the smaller node id goes first."""
        left = (time.monotonic() if claimed_at is None else claimed_at) + CLAIM_WAIT - time.monotonic()
        if left > 0:
            self.stop.wait(left)  # what arrives meanwhile is read after: no need to wake for it
        with self.mesh.cond:
            for node, (_, rf) in self.view()[1].items():
                held = rf.have.get(index)
                if (held is not None and held[0] not in self.mesh.banned) or (
                        held is None and rf.taken.get(index) and node < self.node):
                    return True
        return False

    def _provenance_says(self, provenance: str, index: int) -> str | None:
        """The digest the provenance node itself publishes for chunk ``index``, if we hear it."""
        with self.mesh.cond:
            known = self.view()[1].get(provenance)
            got = known[1].have.get(index) if known is not None else None
        return got[1] if got is not None else None

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

    # ---- fetching owned chunks ahead ------------------------------------------------------------

    def _run_ahead(self, origin: OriginRead, halt: threading.Event, fd: int) -> None:
        """Fetch the chunks this node owns from the origin, lowest first, into the partial file
        through ``fd`` (closed at the end), while there are other members to give them to. The
        next chunk is claimed while one is fetched, so its wait for a rival claim costs no time."""
        buf = memoryview(bytearray(self.chunk))
        claimed: tuple[int, float] | None = None
        try:
            while True:
                if claimed is None:
                    first = self._next_owned(halt, wait=True)
                    if first is None:
                        return
                    claimed = self._claim(first)
                i, at = claimed
                claimed = None
                rec: Record | None = None
                try:
                    if not self._yield_claim(i, at):
                        with self.swarm.ahead_slot:  # one origin stream per node, all files
                            after = self._next_owned(halt, wait=False)
                            claimed = self._claim(after) if after is not None else None
                            data = origin(i, buf[:self.chunk_len(i)])
                        pwrite_all(fd, data, i * self.chunk, self.staging)
                        rec = Record(self.node, chunk_digest(data), ORIGIN)
                        with self.lock:
                            self.origin_bytes += len(data)
                except (Stopped, FetchError, OSError) as e:
                    log.info("%s: fetching ahead stopped: %s", self.path, e)
                    return
                finally:
                    self._landed(i, rec)
                log.debug("%s: chunk %d %s ahead from the origin", self.path, i,
                          "fetched" if rec is not None else "left to another node")
        finally:
            os.close(fd)
            if claimed is not None:
                with self.local:
                    self.ahead.discard(claimed[0])
                    self.local.notify_all()

    # ---- taking the rarest chunks from peers ahead ---------------------------------------------

    def _run_rare(self, halt: threading.Event, fd: int) -> None:
        """Take from peers, into the partial file through ``fd`` (closed at the end), the chunks
        the fewest peers hold, whichever the download is at: nodes that all download in the same
        order hold the same chunks and have little to give each other, and every node asks a
        fresh chunk's one holder for it at once."""
        buf = memoryview(bytearray(self.chunk))
        try:
            while not halt.is_set() and not self.stop.is_set():
                pick = self._next_rare(halt)
                if pick is None:
                    return
                i, peer, provenance, digest = pick
                rec: Record | None = None
                try:
                    got = self._from_peer(peer, provenance, digest, i, buf[:self.chunk_len(i)])
                    if got is not None:
                        pwrite_all(fd, buf[:self.chunk_len(i)], i * self.chunk, self.staging)
                        rec = got
                except (Stopped, OSError) as e:
                    log.info("%s: taking rare chunks stopped: %s", self.path, e)
                    return
                finally:
                    self._landed(i, rec)
                if rec is None:
                    halt.wait(TICK)  # that peer failed: not at once again
        finally:
            os.close(fd)

    def _next_rare(self, halt: threading.Event) -> tuple[int, Peer, str, str] | None:
        """Of the first :data:`RARE_WINDOW` chunks that this node neither has nor is fetching,
        the one the fewest peers hold (ties at random), marked as fetched ahead, with the peer to
        take it from (the one with the fewest of our requests); waits for one; None when none is
        left."""
        total = chunks_of(self.size, self.chunk)
        with self.mesh.cond:
            while not halt.is_set() and not self.stop.is_set():
                now = time.monotonic()
                with self.lock:
                    local = self._in_hand()
                    if len(local) >= total:
                        return None
                missing = itertools.islice((i for i in range(total) if i not in local), RARE_WINDOW)
                held = [(i, holders) for i in missing if (holders := self._holders(i, set(), now)[0])]
                if held:
                    fewest = min(len(holders) for _, holders in held)
                    i, holders = random.choice([(i, h) for i, h in held if len(h) == fewest])
                    if self._reserve(i):
                        p, (provenance, digest) = _least_asked(holders)
                        return i, p, provenance, digest
                self.mesh.cond.wait(TICK)
        return None

    def _claim(self, index: int) -> tuple[int, float]:
        self.board.take(self.sha256, index, origin=True)
        return index, time.monotonic()

    def _next_owned(self, halt: threading.Event, *, wait: bool) -> int | None:
        """The next chunk this node owns that nobody has or is fetching (marked as fetched
        ahead), waiting for one when ``wait``; None when there is none (left)."""
        total = chunks_of(self.size, self.chunk)
        with self.mesh.cond:
            while not halt.is_set() and not self.stop.is_set():
                members, peers = self.view()
                with self.lock:
                    local = self._in_hand()
                    if len(self.records) >= total:
                        return None
                if len(members) > 1:
                    me, n = members.index(self.node), len(members)
                    for i in range(me, total, n):
                        if i in local or any(i in rf.have or rf.taken.get(i) for _, rf in peers.values()):
                            continue
                        if self._reserve(i):
                            return i
                if not wait:
                    return None
                self.mesh.cond.wait(2 * TICK)
        return None

    def _in_hand(self) -> set[int]:
        """The chunks on disk, handed to the download, or being fetched (call with the lock held)."""
        return self.records.keys() | self.pending.keys() | self.ahead | self.busy

    def _reserve(self, index: int) -> bool:
        """Mark chunk ``index`` as fetched ahead, unless it is in hand already (since the caller
        looked: the download takes chunks without the mesh's lock)."""
        with self.lock:
            if index in self._in_hand():
                return False
            self.ahead.add(index)
            return True


def _least_asked(holders: list[tuple[Peer, tuple[str, str]]]) -> tuple[Peer, tuple[str, str]]:
    """The holder with the fewest of our requests in flight (ties at random), counted as asked
    once more (call with the mesh's condition held)."""
    p, claim = min(holders, key=lambda h: (h[0].inflight, random.random()))
    p.inflight += 1
    return p, claim


class _PeerRemote(HttpRemote):
    """A peer's blob: an HTTP range reader that keeps what the reply vouched for."""

    claim: tuple[str, str] | None = None

    def _check_range_reply(self, r: urllib3.BaseHTTPResponse, start: int, end: int,
                           validator: str | None) -> None:
        super()._check_range_reply(r, start, end, validator)
        prov, _, digest = (r.headers.get(CHUNK_HEADER) or "").partition(" ")
        self.claim = (prov, digest) if NODE_ID.match(prov) and SHA256.match(digest) else None
