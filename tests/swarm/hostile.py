"""A swarm peer that lies, for the tests: it speaks the real protocol (weightship.swarm's board
and server), says it has every chunk of a model's files, and serves bytes with one bit flipped
in every chunk.

- ``consistent``: it publishes the sha256 of its flipped chunks, so each chunk checks out
  against what it said; only the file's digest at the end gives it away;
- ``inconsistent``: it publishes the true chunk digests, so the first chunk a node takes from it
  gives it away.

Run: ``python -m tests.swarm.hostile MODEL_DIR --listen ADDR:PORT --chunk BYTES --mode MODE
--work DIR``; it prints ``ready`` when it serves.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import sys
from pathlib import Path

from weightship.manifest import Manifest
from weightship.swarm.board import Board
from weightship.swarm.protocol import chunk_digest, chunks_of
from weightship.swarm.server import PeerServer


def flipped_copy(src: Path, dst: Path, chunk: int) -> None:
    """``src`` with the first byte of every chunk inverted."""
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    with open(dst, "r+b") as f:
        for i in range(chunks_of(size, chunk)):
            f.seek(i * chunk)
            byte = f.read(1)
            f.seek(i * chunk)
            f.write(bytes([byte[0] ^ 0xFF]))


def serve(model: Path, host: str, port: int, chunk: int, mode: str, work: Path) -> None:
    board = Board("hostile-" + mode)
    for entry in Manifest.load(model).files:
        bad = work / hashlib.sha256(entry.path.encode()).hexdigest()
        flipped_copy(model / entry.path, bad, chunk)
        fd = os.open(bad, os.O_RDONLY)
        board.share(entry.sha256, entry.size, chunk, fd)
        with open(model / entry.path, "rb") as good:
            for i in range(chunks_of(entry.size, chunk)):
                served = os.pread(fd, chunk, i * chunk)
                true = good.read(chunk)
                board.have(entry.sha256, i, board.node,
                           chunk_digest(served if mode == "consistent" else true))
        board.done(entry.sha256)
    server = PeerServer(board, host, port).start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--chunk", type=int, required=True)
    parser.add_argument("--mode", choices=("consistent", "inconsistent"), required=True)
    parser.add_argument("--work", type=Path, required=True)
    a = parser.parse_args()
    host, _, port = a.listen.rpartition(":")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    serve(a.model, host, int(port), a.chunk, a.mode, a.work)
    sys.exit(0)


if __name__ == "__main__":
    main()
