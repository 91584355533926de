"""After a file's sha256 did not match: which peer lied, and which chunks to fetch again.

Every chunk on disk has a record (:mod:`.records`): its digest as it arrived, the node that
vouched for it (its provenance) and the peer that sent it. A peer whose bytes contradicted its own
reply was banned as they arrived, so what is left is a node that lied consistently (bytes and
digest both wrong), a chunk damaged on disk, or an origin that serves other bytes than the
trust anchor says. In that order:

1. chunks whose bytes on disk no longer hash to their record, and chunks vouched for or sent by
   a node banned since, are fetched again, without asking the origin anything;
2. else one chunk of each provenance node (the ones that vouched for most of the file first) is
   compared with the origin's; the first node found with a different chunk is banned, its other
   chunks are fetched again, and the origin's chunk replaces the one on disk. The chunk compared
   is one this node would take from the origin anyway were that node banned (no other peer
   vouches for it; one this node would own first), so that the comparison costs the origin
   nothing when the node did lie, even with every node of the swarm repairing at once;
3. else every peer-vouched chunk is compared the same way (a node that lied about one chunk);
4. else no peer is to blame: the caller fails the file as it would without peers.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import TYPE_CHECKING

from weightship.fetch.chunkfile import pwrite_all
from weightship.fetch.exchange import OriginRead
from weightship.swarm.protocol import chunk_digest
from weightship.swarm.records import ORIGIN, Record

if TYPE_CHECKING:
    from weightship.swarm.exchange import PeerExchange


def suspects(ex: PeerExchange, origin: OriginRead) -> set[int] | None:
    """Chunks of ``ex``'s file to fetch again (peers found lying banned); None when no peer is
    to blame. See the module docstring."""
    with ex.lock:
        records = dict(ex.records)
    banned = ex.mesh.banned
    redo = {i for i, rec in records.items()
            if rec.provenance in banned or rec.sender in banned or ex.on_disk(i) != rec.digest}
    if not redo:
        caught = _compare_with_origin(ex, records, origin)
        if caught is None:
            return None
        redo = caught
    ex.forget(redo)
    return redo


def _compare_with_origin(ex: PeerExchange, records: dict[int, Record], origin: OriginRead) -> set[int] | None:
    """Steps 2 and 3 of the module docstring: the other chunks of the first provenance node
    caught, or None."""
    by_node: dict[str, list[int]] = defaultdict(list)
    for i, rec in sorted(records.items()):
        if rec.provenance != ex.node:
            by_node[rec.provenance].append(i)
    buf = memoryview(bytearray(ex.chunk))
    checked: set[int] = set()
    ranked = sorted(by_node.items(), key=lambda kv: -len(kv[1]))
    for sample in (True, False):
        for node, indices in ranked:
            for i in ([_sample(ex, node, indices)] if sample else indices):
                if i in checked:
                    continue
                checked.add(i)
                theirs = origin(i, buf[:ex.chunk_len(i)])
                with ex.lock:
                    ex.origin_bytes += len(theirs)
                digest = chunk_digest(theirs)
                if digest != records[i].digest:
                    ex.mesh.ban_node(node, f"its chunk {i} of {ex.path} is not the origin's")
                    _replace(ex, i, theirs, digest)
                    return {j for j in indices if j != i}
    return None


def _sample(ex: PeerExchange, node: str, indices: list[int]) -> int:
    """The chunk of ``indices`` (vouched for by ``node``) to compare with the origin's: see step
    2 of the module docstring; at random among equals."""
    with ex.mesh.cond:
        members, peers = ex.view()
        others = [m for m in members if m != node]
        vouched = {i for m, (_, rf) in peers.items() if m != node
                   for i, (provenance, _) in rf.have.items() if provenance != node}

    def rank(i: int) -> int:
        if i in vouched:
            return 2
        return 0 if others and others[i % len(others)] == ex.node else 1

    best = min(map(rank, indices))
    return random.choice([i for i in indices if rank(i) == best])


def _replace(ex: PeerExchange, index: int, data: memoryview, digest: str) -> None:
    """Write the origin's bytes of chunk ``index`` over the ones on disk (no reply reading them
    meanwhile), and say so."""
    fd = ex.read_fd
    assert fd is not None
    ex.board.drop(ex.sha256, {index})
    pwrite_all(fd, data, index * ex.chunk, ex.staging)
    ex.keep(index, Record(ex.node, digest, ORIGIN))
