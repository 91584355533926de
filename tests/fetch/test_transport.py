"""The HTTP transport on its own: redirects, credentials, and replies to ranged reads."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import Pki
from tests.fetch.webserver import FileServer, serve
from weightship.errors import (
    AccessDeniedError,
    FetchError,
    RemoteChangedError,
    RemoteNotFoundError,
    TransientFetchError,
)
from weightship.fetch.download import download
from weightship.fetch.options import TransferOptions
from weightship.fetch.transport import HttpPool, HttpRemote, raise_for_status

DATA = hashlib.shake_256(b"redirect").digest(3 << 20)
OPTS = TransferOptions(connections=3, chunk_size=256 << 10, backoff=0.001, backoff_max=0.002)


@pytest.fixture
def cdn(tmp_path: Path) -> Iterator[FileServer]:
    (tmp_path / "w.bin").write_bytes(DATA)
    with serve(tmp_path) as s:
        yield s


class _Origin(ThreadingHTTPServer):
    """Answers every request with a redirect to ``target`` (a path on the same origin is
    served by redirecting again, to the CDN), recording the Authorization header it saw."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        super().__init__(("127.0.0.1", 0), _Redirect)
        self.target = target
        self.authorizations: list[str | None] = []


class _Redirect(BaseHTTPRequestHandler):
    server: _Origin

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _redirect(self) -> None:
        self.server.authorizations.append(self.headers.get("Authorization"))
        hop = self.path.startswith("/hop/")  # first a redirect within the origin, then away
        self.send_response(302)
        self.send_header("Location", self.path[4:] if hop else self.server.target + self.path.lstrip("/"))
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _redirect


@pytest.fixture
def origin(cdn: FileServer) -> Iterator[_Origin]:
    server = _Origin(cdn.url)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_token_stays_on_its_host_across_redirects(origin: _Origin, cdn: FileServer, tmp_path: Path) -> None:
    pool = HttpPool(OPTS)
    url = f"http://127.0.0.1:{origin.server_address[1]}/hop/w.bin"
    remote = HttpRemote(pool, url, headers={"Authorization": "Bearer s3cret"})
    result = download(remote, tmp_path / "w", expected_size=len(DATA),
                      sha256=hashlib.sha256(DATA).hexdigest(), opts=OPTS)
    assert (tmp_path / "w").read_bytes() == DATA and result.fetched_bytes == len(DATA)
    assert origin.authorizations == ["Bearer s3cret", "Bearer s3cret"]  # both hops on the origin
    assert cdn.authorizations and set(cdn.authorizations) == {None}  # the CDN never saw it


def test_errors_name_the_url_given_not_where_it_led(origin: _Origin, cdn: FileServer) -> None:
    cdn.lie("etag_change")
    remote = HttpRemote(HttpPool(OPTS), f"http://127.0.0.1:{origin.server_address[1]}/w.bin?sig=SECRET",
                        where="s3://bucket/model/w.bin", if_match=True)
    st = remote.stat()
    with pytest.raises(RemoteChangedError) as e:
        list(remote.read_range(0, 10, st.validator, memoryview(bytearray(10))))
    assert "s3://bucket/model/w.bin" in str(e.value) and "SECRET" not in str(e.value)
    assert "412" in str(e.value)  # the If-Match sent with the range was refused


def test_one_connection_carries_every_range(cdn: FileServer, tmp_path: Path) -> None:
    opts = TransferOptions(connections=1, chunk_size=256 << 10)
    remote = HttpRemote(HttpPool(opts), cdn.url + "w.bin")
    download(remote, tmp_path / "w", expected_size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest(), opts=opts)
    assert cdn.requests == len(DATA) // (256 << 10) and cdn.connections == 1


def test_a_body_left_unread_never_carries_the_next_request(cdn: FileServer) -> None:
    remote = HttpRemote(HttpPool(OPTS), cdn.url + "w.bin")
    st = remote.stat()
    reads = remote.read_range(0, 2 << 20, st.validator, memoryview(bytearray(2 << 20)))
    next(reads)
    reads.close()  # the consumer gave up after the first piece: 2 MiB minus that are unread
    buf = memoryview(bytearray(1000))
    assert b"".join(bytes(v) for v in remote.read_range(5000, 6000, st.validator, buf)) == DATA[5000:6000]
    assert cdn.connections == 2


# ---- redirects across schemes (issue 17, item 3) -----------------------------------------------


class _DualPort:
    """One loopback port that speaks TLS and plain HTTP (it peeks at the first byte), so that a
    redirect can change only the scheme, as ``https://host/`` to ``http://host/`` does on the
    default ports. Records each request's scheme and ``Authorization``; ``/to-http/X`` and
    ``/to-https/X`` redirect to ``X`` over the other scheme, anything else answers 200."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[str, str | None]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError), conn:
            tls = conn.recv(1, socket.MSG_PEEK) == b"\x16"  # a TLS handshake record
            sock = self.ctx.wrap_socket(conn, server_side=True) if tls else conn
            f = sock.makefile("rb")
            method, path, _ = f.readline().decode().split(" ", 2)
            auth = None
            while (line := f.readline().decode()) not in ("\r\n", "\n", ""):
                name, _, value = line.partition(":")
                if name.strip().lower() == "authorization":
                    auth = value.strip()
            self.seen.append(("https" if tls else "http", auth))
            for prefix, scheme in (("/to-http/", "http"), ("/to-https/", "https")):
                if path.startswith(prefix):
                    head = (f"HTTP/1.1 302 Found\r\nLocation: {scheme}://127.0.0.1:{self.port}/"
                            f"{path[len(prefix):]}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    break
            else:
                head = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
            sock.sendall(head.encode() + (b"hello" if method == "GET" and " 200 " in head else b""))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dual(pki: Pki) -> Iterator[_DualPort]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.cert, pki.key)
    server = _DualPort(ctx)
    yield server
    server.close()


# A large file's first request (urllib3) and a small file's whole GET (libcurl) follow the same rules
READS = [pytest.param(lambda r: r.stat().size, id="stat"), pytest.param(lambda r: len(r.read_all(5)), id="whole")]


@pytest.mark.parametrize("read", READS)
def test_a_redirect_from_https_to_http_is_never_followed(dual: _DualPort, pki: Pki,
                                                         read: Callable[[HttpRemote], int]) -> None:
    pool = HttpPool(OPTS, ca_certs=str(pki.ca))
    remote = HttpRemote(pool, f"https://127.0.0.1:{dual.port}/to-http/w.bin",
                        headers={"Authorization": "Bearer s3cret"})
    with pytest.raises(FetchError, match="redirected https to http"):
        read(remote)
    assert dual.seen == [("https", "Bearer s3cret")]  # nothing, and no token, went out in clear


@pytest.mark.parametrize("read", READS)
def test_credentials_are_dropped_when_the_scheme_changes(dual: _DualPort, pki: Pki,
                                                         read: Callable[[HttpRemote], int]) -> None:
    pool = HttpPool(OPTS, ca_certs=str(pki.ca))
    remote = HttpRemote(pool, f"http://127.0.0.1:{dual.port}/to-https/w.bin",
                        headers={"Authorization": "Bearer s3cret"})
    assert read(remote) == 5
    assert dual.seen == [("http", "Bearer s3cret"), ("https", None)]


def test_a_whole_get_that_stalls_is_given_up_and_retryable() -> None:
    """A server that sends its headers and part of a small file, then nothing: the read ends
    after the stall time as a retryable error, not a hang."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def stall() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
        held.append(conn)  # kept open, silent

    threading.Thread(target=stall, daemon=True).start()
    remote = HttpRemote(HttpPool(TransferOptions(stall_timeout=1.0)), f"http://127.0.0.1:{server.getsockname()[1]}/f")
    with pytest.raises(TransientFetchError, match="stalled"):
        remote.read_all(5)
    for conn in [*held, server]:
        conn.close()


@pytest.mark.parametrize(("status", "error"), [(404, RemoteNotFoundError), (410, RemoteNotFoundError),
                                               (401, AccessDeniedError), (403, AccessDeniedError)])
def test_a_refusal_names_the_remote_as_an_attribute(status: int, error: type[FetchError]) -> None:
    """Callers (the failover, --json) learn which remote refused without parsing the message."""
    with pytest.raises(error) as caught:
        raise_for_status(status, "https://models.example/m/config.json")
    assert caught.value.where == "https://models.example/m/config.json"  # type: ignore[attr-defined]
    assert str(caught.value).startswith("https://models.example/m/config.json: HTTP ")


# ---- a proxy from the environment, for ranged reads (urllib3) and whole GETs (libcurl) alike -----


class _Proxy(ThreadingHTTPServer):
    """A plain-HTTP forward proxy: relays each absolute-URI request and records it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Relay)
        self.seen: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Relay(BaseHTTPRequestHandler):
    server: _Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _relay(self) -> None:
        self.server.seen.append((self.command, self.path))
        parts = urlsplit(self.path)
        upstream = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        upstream.request(self.command, parts.path or "/", headers=headers)
        reply = upstream.getresponse()
        body = reply.read()
        self.send_response(reply.status)
        for k, v in reply.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", reply.getheader("Content-Length") if self.command == "HEAD"
                         else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        upstream.close()

    do_GET = do_HEAD = _relay


@pytest.mark.parametrize("mode", ["via-proxy", "no_proxy", "a-pool-without-proxies"])
def test_the_proxy_of_the_environment_carries_every_request(cdn: FileServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The proxy the environment names (``http_proxy``, ``NO_PROXY``, as urllib reads them), for the
    pool's ranged reads and its whole GETs alike; none for a pool made without proxies (the swarm's
    peers). libcurl is given the pool's choice, never left to read the environment its own way."""
    (tmp_path / "srv").mkdir()
    small = hashlib.shake_256(b"small").digest(3000)
    (tmp_path / "srv" / "s.bin").write_bytes(small)
    proxy = _Proxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("http_proxy", proxy.url)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1" if mode == "no_proxy" else "")
    with serve(tmp_path / "srv") as small_server:
        pool = HttpPool(OPTS, proxies=mode != "a-pool-without-proxies")
        assert bytes(HttpRemote(pool, small_server.url + "s.bin").read_all(len(small))) == small
        download(HttpRemote(pool, cdn.url + "w.bin"), tmp_path / "w", expected_size=len(DATA),
                 sha256=hashlib.sha256(DATA).hexdigest(), opts=OPTS)
    proxy.shutdown()
    proxy.server_close()
    assert (tmp_path / "w").read_bytes() == DATA
    if mode == "via-proxy":
        urls = {url for _, url in proxy.seen}
        assert small_server.url + "s.bin" in urls and cdn.url + "w.bin" in urls, proxy.seen
    else:
        assert proxy.seen == []
