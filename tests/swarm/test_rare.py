"""Beside the download's own reads in order, a node takes from peers the chunks that the fewest
of them hold. Nodes that all download in the same order hold the same chunks and have little to
give each other; on 8 shaped nodes (bench/fleet.py, 100 Mbit/s links, where the CPU is not the
limit) a rollout took 61-71 s against 58-61 s with these reads."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from weightship.swarm.exchange import RARE_WINDOW, PeerExchange
from weightship.swarm.mesh import Mesh, Peer
from weightship.swarm.records import ORIGIN, Record
from weightship.torrent.peers import PeerSource

SHA = "ab" * 32
CHUNK = 4096
CHUNKS = 8
DIGEST = "cd" * 32
NODE_A, NODE_B, NODE_C = "a" * 16, "b" * 16, "c" * 16


def _peer(mesh: Mesh, port: int, node: str, have: range, chunks: int = CHUNKS) -> Peer:
    peer = mesh.peers[("127.0.0.1", port)] = Peer("127.0.0.1", port)
    events: list[list[Any]] = [["file", SHA, chunks * CHUNK, CHUNK]]
    events += [["have", SHA, i, node, DIGEST] for i in have]
    assert mesh._apply(peer, {"node": node, "epoch": "e1", "next": len(events), "events": events})
    return peer


def _exchange(tmp_path: Path, mesh: Mesh | None = None, chunks: int = CHUNKS) -> tuple[PeerExchange, dict[str, Peer]]:
    peers = {}
    if mesh is None:
        mesh = Mesh("me" * 8, PeerSource.from_options((), None))
        peers = {"a": _peer(mesh, 1, NODE_A, range(4)), "b": _peer(mesh, 2, NODE_B, range(3)),
                 "c": _peer(mesh, 3, NODE_C, range(2))}
    swarm = SimpleNamespace(mesh=mesh, board=None, node="me" * 8, opts=SimpleNamespace(stall=30.0))
    ex = PeerExchange(swarm, SHA, chunks * CHUNK, tmp_path / "f.incomplete", tmp_path, "f")  # type: ignore[arg-type]
    ex.chunk = CHUNK
    return ex, peers


def test_the_rarest_chunk_first_from_a_peer_that_holds_it(tmp_path: Path) -> None:
    ex, peers = _exchange(tmp_path)
    ex.records[0] = Record(NODE_A, DIGEST, ORIGIN)  # chunk 0: on disk already
    halt = threading.Event()
    taken = []
    for _ in range(3):
        pick = ex._next_rare(halt)
        assert pick is not None
        taken.append((pick[0], pick[1].node))
    # chunk 3 is held by one peer, 2 by two, 1 by three; 0 is here; 4-7 nobody has
    assert [i for i, _ in taken] == [3, 2, 1]
    assert taken[0][1] == NODE_A and taken[1][1] in (NODE_A, NODE_B)
    assert ex.ahead == {1, 2, 3}  # the download waits for them instead of fetching them again
    assert sum(p.inflight for p in peers.values()) == 3
    halt.set()
    assert ex._next_rare(halt) is None  # nothing else any peer holds: it waits, and stops when told


def test_a_chunk_the_download_is_fetching_is_not_taken_twice(tmp_path: Path) -> None:
    ex, _ = _exchange(tmp_path)
    ex.records[0] = Record(NODE_A, DIGEST, ORIGIN)
    ex.busy.add(3)  # the download's own read of chunk 3 is in flight
    ex.pending[2] = Record(NODE_B, DIGEST, "peer")  # chunk 2 arrived, not written yet
    pick = ex._next_rare(threading.Event())
    assert pick is not None and pick[0] == 1


def test_only_the_chunks_the_download_reaches_soon_are_taken(tmp_path: Path) -> None:
    chunks = RARE_WINDOW + 16
    mesh = Mesh("me" * 8, PeerSource.from_options((), None))
    _peer(mesh, 1, NODE_A, range(chunks), chunks)
    _peer(mesh, 2, NODE_B, range(chunks - 8), chunks)  # the last 8 only A holds: rarer, but far
    ex, _ = _exchange(tmp_path, mesh, chunks)
    ex.records.update({i: Record(NODE_A, DIGEST, ORIGIN) for i in range(8)})  # the download's start
    pick = ex._next_rare(threading.Event())
    assert pick is not None and 8 <= pick[0] < chunks - 8  # two holders, but among the next missing
