"""Hand-made hostile torrents (each path attack and each load limit) and a peer that lies.

:class:`CorruptPeer` speaks just enough of the BitTorrent wire protocol (BEP 3) to claim every
piece and answer every request with random bytes: the "one corrupt seeder" of the smart-ban
tests. Real clients never do this, so it has to be written by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Any

import libtorrent as lt

PIECE = 16 << 10


def info(files: list[dict[bytes, Any]] | None = None, **extra: Any) -> dict[bytes, Any]:
    """A v1 info dict with valid-looking pieces for ``files`` (default: one 10-byte file)."""
    files = files if files is not None else [{b"length": 10, b"path": [b"ok.bin"]}]
    total = sum(f[b"length"] for f in files)
    d: dict[bytes, Any] = {b"name": b"model", b"piece length": PIECE,
                           b"pieces": b"\x01" * 20 * max(1, -(-total // PIECE)), b"files": files}
    d.update({k.encode() if isinstance(k, str) else k: v for k, v in extra.items()})
    return d


def torrent(info_dict: dict[bytes, Any]) -> bytes:
    """The .torrent bytes of ``info_dict``."""
    data: bytes = lt.bencode({b"info": info_dict})
    return data


def nested(depth: int) -> bytes:
    """A torrent whose info dict nests lists ``depth`` deep."""
    inner = b"l" * depth + b"e" * depth
    body = torrent(info())
    return body[:-2] + b"4:deep" + inner + b"ee"


def many_tokens(n: int) -> bytes:
    """A torrent with ``n`` extra tokens (empty strings) in one list."""
    body = torrent(info())
    return body[:-2] + b"5:junkl" + b"0:" * n + b"eee"


def too_many_pieces(n: int) -> bytes:
    """A torrent claiming ``n`` pieces."""
    d = info([{b"length": n * PIECE, b"path": [b"big.bin"]}])
    return torrent(d)


def big(size: int) -> bytes:
    """A well-formed torrent of ``size`` bytes (padded with a comment)."""
    return lt.bencode({b"comment": b"x" * size, b"info": info()})


def symlink() -> bytes:
    return torrent(info([{b"length": 10, b"path": [b"ok.bin"]},
                         {b"length": 0, b"path": [b"link"], b"attr": b"l", b"symlink path": [b"..", b"..", b"etc"]}]))


HOSTILE_PATHS: dict[str, bytes] = {
    "dotdot": torrent(info([{b"length": 10, b"path": [b"..", b"..", b"evil"]}])),
    "absolute": torrent(info([{b"length": 10, b"path": [b"/etc/evil"]}])),
    "drive-letter": torrent(info([{b"length": 10, b"path": [b"C:", b"evil"]}])),
    "unc": torrent(info([{b"length": 10, b"path": [b"\\\\server\\share\\evil"]}])),
    "nul": torrent(info([{b"length": 10, b"path": [b"evil\x00.bin"]}])),
    "symlink": symlink(),
    "single-file-dotdot": torrent({b"name": b"../evil", b"piece length": PIECE, b"pieces": b"\x01" * 20,
                                   b"length": 10}),
    "utf8-spelling": torrent(info([{b"length": 10, b"path": [b"ok.bin"], b"path.utf-8": [b"..", b"evil"]}])),
    "state-dir": torrent(info([{b"length": 10, b"path": [b".weightship", b"manifest.json"]}])),
    "duplicate": torrent(info([{b"length": 10, b"path": [b"a"]}, {b"length": 10, b"path": [b"a"]}])),
    "root-name": torrent(info(name=b"..")),
}

OVER_LIMITS: dict[str, bytes] = {
    "buffer-size": big(9 << 20),
    "decode-depth": nested(200),
    "decode-tokens": many_tokens(1_100_000),
    "piece-count": too_many_pieces((1 << 18) + 1),
}


class CorruptPeer:
    """A seeder on ``host`` that claims every piece and sends garbage for every block."""

    def __init__(self, infohash: bytes, num_pieces: int, host: str = "127.0.0.2") -> None:
        self.infohash = infohash
        self.num_pieces = num_pieces
        self.sock = socket.create_server((host, 0))
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.blocks_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._peer, args=(conn,), daemon=True).start()

    def _peer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            hs = self._read(conn, 68)
            if hs[28:48] != self.infohash:
                return
            conn.sendall(hs[:20] + bytes(8) + self.infohash + b"-XX0001-" + os.urandom(12))
            bits = bytearray(-(-self.num_pieces // 8))
            for i in range(self.num_pieces):
                bits[i // 8] |= 0x80 >> (i % 8)
            conn.sendall(struct.pack(">IB", 1 + len(bits), 5) + bits + struct.pack(">IB", 1, 1))
            while not self._stop.is_set():
                (length,) = struct.unpack(">I", self._read(conn, 4))
                if length == 0:
                    continue
                msg = self._read(conn, length)
                if msg[0] == 6:  # request: index, begin, length
                    index, begin, size = struct.unpack(">III", msg[1:13])
                    conn.sendall(struct.pack(">IBII", 9 + size, 7, index, begin) + os.urandom(size))
                    self.blocks_sent += 1
        except (OSError, struct.error, IndexError):
            pass
        finally:
            conn.close()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise OSError("closed")
            buf += chunk
        return buf

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)
