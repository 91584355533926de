"""How long a fetch that is done keeps serving (``--seed-for``): until every peer it knows has
verified the model, not counting a peer that serves another model. The chart's seeders find
each other by a Service name, so while the DaemonSet rolls to a new model the previous
model's seeders are among a new seeder's peers; waiting for them to verify a model they never
fetch held each new seeder for the whole ``p2p.handoverSeconds`` (600 s by default)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import free_port, wait_until
from weightship.swarm.board import Board
from weightship.swarm.mesh import Mesh
from weightship.swarm.protocol import chunk_digest
from weightship.swarm.server import PeerServer
from weightship.torrent.peers import PeerSource

CHUNK = 4096


def _node(tmp: Path, name: str, data: bytes, done: bool) -> tuple[Board, PeerServer, str]:
    """A real peer server sharing one file (whole, verified when ``done``)."""
    f = tmp / name
    f.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    board = Board(name)
    board.share(sha, len(data), CHUNK, os.open(f, os.O_RDONLY))
    for i in range(len(data) // CHUNK):
        board.have(sha, i, name, chunk_digest(data[i * CHUNK:(i + 1) * CHUNK]))
    if done:
        board.done(sha)
    return board, PeerServer(board, "127.0.0.1", 0).start(), sha


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Mesh, str, str]]:
    """This node's mesh, reading three peers: ``old-model`` (a seeder of another model, done
    with it), ``fetching`` (shares this model's file, not verified yet) and one that has not
    answered yet (nothing listens on its port)."""
    ours = os.urandom(4 * CHUNK)
    old_board, old, _ = _node(tmp_path, "old-model", os.urandom(4 * CHUNK), done=True)
    new_board, new, sha = _node(tmp_path, "fetching", ours, done=False)
    mesh = Mesh("this-node", PeerSource.from_options((f"127.0.0.1:{old.port}", f"127.0.0.1:{new.port}",
                                                       f"127.0.0.1:{free_port()}"))).start()
    try:
        yield mesh, sha, f"127.0.0.1:{old.port}"
    finally:
        mesh.close()
        for board, server in ((old_board, old), (new_board, new)):
            board.close()
            server.stop()


def test_a_peer_serving_another_model_is_not_waited_for(peers: tuple[Mesh, str, str]) -> None:
    mesh, sha, old = peers
    wait_until(lambda: len([p for p in mesh.peers.values() if p.alive]) == 2, 10, "both peers to answer")
    assert sorted(mesh.not_done({sha})) == sorted(p.name for p in mesh.peers.values())  # no give_up
    # a peer that has not answered yet is waited for until give_up (a node still starting)
    assert len(mesh.not_done({sha}, give_up=30.0)) == 3
    time.sleep(1.2)  # nothing new from either peer for longer than give_up (the point of the test)
    waiting = mesh.not_done({sha}, give_up=1.0)
    assert old not in waiting  # before: waited for until --seed-for ran out
    assert len(waiting) == 1  # a peer that shares the file is waited for, however quiet
