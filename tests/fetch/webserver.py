"""A small HTTP file server for the fetch tests, with Range support and faults to inject.

It serves a directory like any static web server (so ``https://`` fetches of a model directory
and its ``.weightship/manifest.json`` work), and can be told to lie: ignore ``Range``, answer
with the wrong ``Content-Range`` or ``Content-Length``, cut bodies short, answer 416 or 503,
change its ETag, flip a bit, answer a range with ``200`` (and the right ``Content-Range``, as
rclone's S3 server does), break off a whole (unranged) body half-way. Each fault applies to
the next ``n`` GETs (or forever). It honours ``If-Match`` (412), records the ``Authorization``
header of every request and counts connections.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
FAULTS = ("ignore_range", "wrong_range", "short", "bad_length", "status_416", "status_503",
          "etag_change", "flip", "stall", "range_as_200", "short_whole")

S = TypeVar("S", bound=ThreadingHTTPServer)


class FileServer(ThreadingHTTPServer):
    """Serves ``root``; see the module docstring."""

    daemon_threads = True

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:  # the handshake happens in the handler's thread, on its first read
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.scheme = "https" if tls else "http"
        self.root = root
        self.faults: dict[str, int | None] = {}  # fault -> GETs left (None: forever)
        self.fault_paths: set[str] | None = None  # only these paths lie (None: all)
        self.bytes_served = 0
        self.requests = 0
        self.connections = 0  # TCP connections accepted
        self.authorizations: list[str | None] = []
        self.etag_generation = 0
        self.delay = 0.0  # seconds to sleep per 64 KiB sent
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up mid-body (killed fetches, reconnects) are expected here

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}/"

    def lie(self, fault: str, times: int | None = None, paths: set[str] | None = None) -> None:
        assert fault in FAULTS, fault
        self.faults[fault] = times
        self.fault_paths = paths

    def take(self, fault: str, path: str) -> bool:
        """Whether ``fault`` applies to this GET (and count it)."""
        with self.lock:
            if fault not in self.faults or (self.fault_paths is not None and path not in self.fault_paths):
                return False
            left = self.faults[fault]
            if left is not None:
                if left <= 1:
                    del self.faults[fault]
                else:
                    self.faults[fault] = left - 1
            return True


class _Handler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _file(self) -> tuple[str, Path] | None:
        rel = unquote(self.path.split("?", 1)[0]).lstrip("/")
        p = (self.server.root / rel).resolve()
        if self.server.root.resolve() not in p.parents or not p.is_file():
            return None
        return rel, p

    def _etag(self, p: Path) -> str:
        st = p.stat()
        tag = hashlib.sha1(f"{p}:{st.st_size}:{st.st_mtime_ns}:{self.server.etag_generation}".encode()).hexdigest()
        return f'"{tag}"'

    def do_HEAD(self) -> None:
        found = self._file()
        if found is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(found[1].stat().st_size))
        self.send_header("ETag", self._etag(found[1]))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests += 1
            srv.authorizations.append(self.headers.get("Authorization"))
        found = self._file()
        if found is None:
            self.send_error(404)
            return
        rel, p = found
        if srv.take("status_503", rel):
            self.send_error(503)
            return
        if srv.take("etag_change", rel):
            srv.etag_generation += 1
        if self.headers.get("If-Match") not in (None, self._etag(p)):
            self.send_error(412)
            return
        size = p.stat().st_size
        m = _RANGE.match(self.headers.get("Range", ""))
        whole = m is None or srv.take("ignore_range", rel)
        start, end = (0, size) if whole or m is None else (
            int(m.group(1)), int(m.group(2)) + 1 if m.group(2) else size)
        # a flip is spent only on a reply that carries the damaged (middle) byte
        flip = start <= size // 2 < end and srv.take("flip", rel)
        if whole:
            body = _read(p, 0, size, flip)
            if srv.take("short_whole", rel):  # Content-Length says all, half arrives
                self._send(200, body[: len(body) // 2], None, size, close=True)
                return
            self._send(200, body, None, size)
            return
        if srv.take("status_416", rel) or start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        end = min(end, size)
        if srv.take("wrong_range", rel):
            start, end = min(start + 1, size - 1), min(end + 1, size)
        body = _read(p, start, end, flip)
        length = len(body)
        if srv.take("bad_length", rel):
            length, body = length - 1, body[:-1]
        if srv.take("short", rel):
            self._send(206, body[: len(body) // 2], (start, end, size), length, close=True)
            return
        self._send(200 if srv.take("range_as_200", rel) else 206, body, (start, end, size), length)

    def _send(self, status: int, body: bytes, rng: tuple[int, int, int] | None, length: int,
              close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", self._etag(self._file()[1]))  # type: ignore[index]
        self.send_header("Accept-Ranges", "bytes")
        if rng is not None:
            self.send_header("Content-Range", f"bytes {rng[0]}-{rng[1] - 1}/{rng[2]}")
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        stall = self.server.take("stall", self._file()[0])  # type: ignore[index]
        view = memoryview(body)
        for i in range(0, len(view), 64 << 10):
            if stall and i >= len(view) // 2:
                time.sleep(3)  # longer than the test's stall timeout
                stall = False
            self.wfile.write(view[i:i + (64 << 10)])
            with self.server.lock:
                self.server.bytes_served += len(view[i:i + (64 << 10)])
            if self.server.delay:
                time.sleep(self.server.delay)
        if close:
            self.close_connection = True


def _read(p: Path, start: int, end: int, flip: bool) -> bytes:
    """Bytes ``[start, end)`` of ``p``; with ``flip``, the middle byte of the file is damaged."""
    with open(p, "rb") as f:
        f.seek(start)
        data = bytearray(f.read(end - start))
    middle = p.stat().st_size // 2
    if flip and start <= middle < end:
        data[middle - start] ^= 1
    return bytes(data)


@contextmanager
def running(server: S) -> Iterator[S]:
    """``server`` served on a thread, shut down and closed afterwards."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def serve(root: Path, tls: ssl.SSLContext | None = None) -> Iterator[FileServer]:
    """A :class:`FileServer` over ``root`` on a free loopback port (HTTPS with ``tls``), stopped
    afterwards."""
    with running(FileServer(root, tls)) as server:
        yield server
