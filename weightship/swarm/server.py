"""The peer server: the two GETs of :mod:`weightship.swarm.protocol`, over this node's board.

The standard library's threaded HTTP server, with bodies sent by ``sendfile`` from the shared
file's descriptor: measured on this kind of machine (loopback, 512 MiB in 16 MiB ranges, four
connections), it served about 1 GB/s for 0.27 s of CPU per GiB, where uvicorn + starlette's
``FileResponse`` served 0.5 GB/s for 2.2 s of CPU per GiB. On a 2-core node that also
receives, writes and hashes the same bytes, the server's CPU is what matters.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from weightship import __version__
from weightship.errors import SwarmError
from weightship.swarm.board import Board
from weightship.swarm.protocol import (
    BLOB_PATH,
    CHUNK_HEADER,
    EVENTS_PATH,
    MAX_WAIT,
    NODE_HEADER,
    NODE_ID,
    SHA256,
    STREAM_TYPE,
    VERSION,
    parse_range,
)

log = logging.getLogger(__name__)

MIN_STREAM_WAIT = 0.5  # seconds between a stream's empty lines, at least (wait=0 would be a flood)
_SENDFILE_MAX = 16 << 20  # bytes per sendfile call: a stop is noticed between calls


class PeerServer(ThreadingHTTPServer):
    """Serves ``board`` on ``(host, port)`` (port 0: any free port); see the module docstring."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, board: Board, host: str, port: int) -> None:
        self.board = board
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise SwarmError(f"cannot listen for peers on {host}:{port}: {e.strerror or e}",
                             hint="choose another --listen address or port") from None
        self.port: int = self.server_address[1]
        self._thread: threading.Thread | None = None

    def server_bind(self) -> None:
        # HTTPServer's own looks up the listen address's host name (``socket.getfqdn``), which
        # no reply uses: where no name server answers (a node with DNS cut off), that took 10 s
        # of every swarm fetch's start.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def start(self) -> PeerServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ws-peer-server", daemon=True)
        self._thread.start()
        return self

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("peer %s: connection ended badly", client_address, exc_info=True)

    def stop(self) -> None:
        """Stop accepting; replies in progress end with their connections."""
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: PeerServer
    protocol_version = "HTTP/1.1"
    server_version = f"weightship/{__version__}"
    timeout = 60  # an idle keep-alive connection is closed after this
    # A reply is written as headers, then body: with Nagle's algorithm the body of a small one (a
    # line of events) waited for the ACK of the headers, which the reader delays (40 ms here).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("peer %s: " + format, self.client_address[0], *args)

    def _reply(self, status: int, body: bytes = b"", kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header(NODE_HEADER, self.server.board.node)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == EVENTS_PATH:
            self._events(parse_qs(url.query))
        elif url.path.startswith(BLOB_PATH) and SHA256.match(url.path[len(BLOB_PATH):]):
            self._blob(url.path[len(BLOB_PATH):])
        else:
            self._reply(404, b"not found\n")

    def _events(self, query: dict[str, list[str]]) -> None:
        try:
            since = int(query.get("since", ["0"])[0])
            wait = min(MAX_WAIT, max(0.0, float(query.get("wait", ["0"])[0])))
        except ValueError:
            self._reply(400, b"bad since or wait\n")
            return
        board = self.server.board
        reader, epoch = query.get("node", [""])[0], query.get("epoch", [""])[0]
        if not NODE_ID.match(reader):
            reader = ""
        if epoch != board.epoch:
            since = 0  # a reader of an earlier run of this node (or a first read)
        elif reader:
            board.seen_by(reader, since)
        since = max(0, since)
        if query.get("stream", [""])[0] == "1":
            self._stream(board, since, max(wait, MIN_STREAM_WAIT), reader)
            return
        nxt, events = board.events(since, wait)
        self._reply(200, _events_line(board, nxt, events), "application/json")

    def _stream(self, board: Board, since: int, wait: float, reader: str) -> None:
        """The events as a stream of replies, one JSON line each, written as they happen (and
        an empty one after ``wait`` seconds without news), until this node stops or the reader
        goes: the price of an event is a line, where a long poll costs a request and a reply."""
        self.send_response(200)
        self.send_header(NODE_HEADER, board.node)
        self.send_header("Content-Type", STREAM_TYPE)
        self.send_header("Connection", "close")  # the body ends when the stream does
        self.end_headers()
        self.close_connection = True
        try:
            while not board.closed:
                nxt, events = board.events(since, wait)
                self.wfile.write(_events_line(board, nxt, events) + b"\n")
                since = nxt
                if reader:  # written on a connection that is up: the reader has it
                    board.seen_by(reader, since)
        except OSError as e:  # the reader went away
            log.debug("peer %s: events stream ended: %s", self.client_address[0], e)

    def _blob(self, sha256: str) -> None:
        board = self.server.board
        with board.cond:
            f = board.files.get(sha256)
            size = f.size if f is not None else None
        if size is None:
            self._reply(404, b"not shared here\n")
            return
        span = parse_range(self.headers.get("Range"), size)
        if span is None:
            self._reply(416, b"one range within the file, bytes=A-B\n")
            return
        start, end = span
        with board.reading(sha256, start, end) as reading:
            if reading is None:
                self._reply(416, b"not all of that range is here yet\n")
                return
            shared, claim = reading
            self.send_response(206)
            self.send_header(NODE_HEADER, board.node)
            if claim is not None:  # what this reply vouches for: checked against its bytes
                self.send_header(CHUNK_HEADER, f"{claim[0]} {claim[1]}")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            self.wfile.flush()
            sent = 0
            try:
                while start + sent < end and not board.closed:
                    n = _sendfile(self.connection, shared.fd, start + sent, min(_SENDFILE_MAX, end - start - sent))
                    if n == 0:  # the file is shorter than it should be: end the reply short
                        break
                    sent += n
            finally:
                with board.cond:
                    shared.sent += sent
            if sent < end - start:
                self.close_connection = True


def _events_line(board: Board, nxt: int, events: list[Any]) -> bytes:
    return json.dumps({"v": VERSION, "node": board.node, "epoch": board.epoch, "next": nxt, "events": events},
                      separators=(",", ":")).encode()


def _sendfile(sock: socket.socket, fd: int, offset: int, count: int) -> int:
    """``os.sendfile`` on a socket that has a timeout (so is non-blocking underneath): waits
    for room in the send buffer, up to the timeout."""
    while True:
        try:
            return os.sendfile(sock.fileno(), fd, offset, count)
        except BlockingIOError:
            if not select.select([], [sock], [], sock.gettimeout())[1]:
                raise TimeoutError("peer stopped reading") from None
