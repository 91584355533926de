"""Loopback helpers shared by the tests and the benchmarks: free ports, waiting for a server,
a relay that counts what a server sends, and a throwaway CA for TLS on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Pki:
    """PEM files: a throwaway CA, and the certificate chain and key it issued for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


def make_pki(d: Path) -> Pki:
    """A CA made now (trustme) and a server certificate for 127.0.0.1, written under ``d``."""
    import trustme

    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    issued.private_key_pem.write_to_path(str(d / "key.pem"))
    for i, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(d / "cert.pem"), append=i > 0)
    return Pki(ca=d / "ca.pem", cert=d / "cert.pem", key=d / "key.pem")


def free_port() -> int:
    """A TCP port nothing listens on right now (UDP on the same number is free too, in practice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host`` (loopback) ``port``."""
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``check`` until it holds; fail with ``what`` after ``timeout`` seconds, or at once
    when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class CountingRelay:
    """A TCP relay on loopback to ``upstream_port`` that counts the bytes the upstream sends
    back (``received``) and records the request line of every request the client sends
    (``requests``, (method, target); requests without a body, such as GETs and HEADs): a counter
    for a server that keeps none, such as rclone."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.received = 0
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                relay._relay(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]

    def __enter__(self) -> CountingRelay:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _relay(self, client: socket.socket) -> None:
        with socket.create_connection(self.upstream) as upstream:
            back = threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True)
            back.start()
            self._pipe(client, upstream, False)
            back.join()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        buf = bytearray(1 << 16)
        pending = b""  # from the client: the part of a request head not yet complete
        try:
            while n := src.recv_into(buf):
                dst.sendall(memoryview(buf)[:n])
                if count:
                    with self._lock:
                        self.received += n
                    continue
                pending += bytes(buf[:n])
                while b"\r\n\r\n" in pending:
                    head, _, pending = pending.partition(b"\r\n\r\n")
                    method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                    with self._lock:
                        self.requests.append((method, target))
        except OSError:  # a killed client resets its connection
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
