"""A chunk waiting for a peer wakes on news of that chunk, or on any other change among the
peers, and not on news of other chunks (with 8 nodes, waking every waiter on every event cost
each node a tenth of its CPU)."""

from __future__ import annotations

import threading

from weightship.swarm.mesh import Mesh, Peer
from weightship.torrent.peers import PeerSource

SHA = "ab" * 32
DIGEST = "cd" * 32
CHUNK = 4096


def _mesh_with_a_peer() -> tuple[Mesh, Peer]:
    mesh = Mesh("me", PeerSource.from_options((), None))
    peer = mesh.peers[("127.0.0.1", 1)] = Peer("127.0.0.1", 1)
    _say(mesh, peer, ["file", SHA, 8 * CHUNK, CHUNK])
    return mesh, peer


def _say(mesh: Mesh, peer: Peer, *events: list[object]) -> None:
    assert mesh._apply(peer, {"node": "them", "epoch": "e1", "next": peer.since + len(events),
                              "events": list(events)})


def _waiter(mesh: Mesh, index: int) -> threading.Event:
    woke = threading.Event()
    ready = threading.Event()

    def wait() -> None:
        with mesh.cond:
            ready.set()
            mesh.wait_chunk(SHA, index, 10)
        woke.set()

    threading.Thread(target=wait, daemon=True).start()
    ready.wait(5)
    return woke


def test_a_waiting_chunk_wakes_on_its_own_news_only() -> None:
    mesh, peer = _mesh_with_a_peer()
    woke = _waiter(mesh, 1)
    _say(mesh, peer, ["take", SHA, 2, "o"], ["have", SHA, 3, "them", DIGEST])
    assert not woke.wait(0.5)
    _say(mesh, peer, ["have", SHA, 1, "them", DIGEST])
    assert woke.wait(5)  # its own news woke it: the wait itself lasts 10 s


def test_a_waiting_chunk_wakes_when_a_peer_is_banned_or_drops_a_chunk() -> None:
    mesh, peer = _mesh_with_a_peer()
    woke = _waiter(mesh, 1)
    mesh.ban(peer, "lied")
    assert woke.wait(1)
    mesh, peer = _mesh_with_a_peer()
    woke = _waiter(mesh, 1)
    _say(mesh, peer, ["drop", SHA, 5])
    assert woke.wait(1)
