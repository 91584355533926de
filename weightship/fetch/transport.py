"""HTTP(S) transport for the download engine: one remote file read by ranged GETs (urllib3).

A server's reply is checked against the request before a byte is used: a ranged GET must come
back ``206`` with a ``Content-Range`` for exactly the bytes asked for, a ``Content-Length`` that
agrees, and the ETag the download started with. A ``200`` to a ranged request means the server
ignores ranges (the engine then reads the file whole), unless it carries a ``Content-Range`` and
a ``Content-Length`` for exactly the range asked for (some S3 servers answer presigned ranged
GETs that way). A short body, a wrong range or a 5xx is retryable; 401/403/404/412/416 are not.
The Hub's ``resolve`` URLs redirect to a CDN: redirects are followed once, at
:meth:`HttpRemote.stat`, and the final URL is used for every range. A redirect from ``https`` to
plain ``http`` is never followed, and credentials (``Authorization``) are dropped as soon as a
redirect changes the scheme, the host or the port.

Every reply's connection goes back to the pool only in a state that can carry the next request:
http.client keeps a bodiless reply (a HEAD's, a 204) "open" until someone reads it, and a pooled
connection with such a reply pending fails its next request with ``ResponseNotReady``, so
:func:`_finish` closes it first.

Bodies are read with http.client's ``readinto`` straight into the downloader's chunk buffers: no
byte is copied into a new object on its way to the disk and the hash (urllib3's own ``readinto``
reads into a new ``bytes`` and copies it, urllib3 issue #1540). Errors name the URL a user gave,
never a redirect target or a presigned URL (their query strings are credentials).

urllib3 rather than httpx: on loopback, httpx spends about twice the CPU per byte received, and
that CPU is what a 2-core machine shares between the network, the disk and sha256. Nor pycurl or
obstore under a large file: under one large object they were within about 10 % of urllib3
(bench/transport.py, bench/RESULTS.md). A small file's one GET is another matter: there the cost
is per request, and libcurl's is about half urllib3's, so :meth:`HttpRemote.read_all` sends it
through :mod:`.curl` (:meth:`HttpPool.get_whole`) and checks the reply here as any other.
(Over 400 lines, on purpose: every check of a reply lives here, beside the one read that each
check guards.)
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, overload
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, SSLError, TimeoutError

from weightship import __version__
from weightship.errors import (
    AccessDeniedError,
    DigestMismatchError,
    FetchError,
    InsecureRedirectError,
    ProtocolViolationError,
    RangeNotSupportedError,
    RemoteChangedError,
    RemoteNotFoundError,
    TransientFetchError,
)
from weightship.fetch.options import TransferOptions
from weightship.fetch.remote import RangeReader, RemoteStat
from weightship.fetch.retry import with_retries

if TYPE_CHECKING:
    from weightship.fetch.curl import CurlLane

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$", re.ASCII)
_MAX_DIGITS = 19  # 10**19 bytes is beyond any file; more digits is a hostile or broken header
_READ = 1 << 20  # bytes per readinto: large enough that per-call overhead vanishes
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
SMALL_LIMIT = 64 << 20  # the most a manifest or other small document may be


def parse_uint(value: str | None, what: str, where: str) -> int:
    """A byte count from a response header: ASCII digits only, at most 19 of them, or
    :class:`ProtocolViolationError` (never ValueError: "12abc", "²" and a 5000-digit number
    come from servers too)."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > _MAX_DIGITS:
        shown = "none" if value is None else repr(value[:32]) + ("…" if len(value) > 32 else "")
        raise ProtocolViolationError(f"{where}: {what} {shown} is not a byte count")
    return int(value)


def _ca_certs(override: str | None) -> str | None:
    """The CA bundle: ``override``, ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``, else certifi's
    (what huggingface_hub and botocore use), else the system's."""
    found = override or os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
    if found:
        return found
    try:
        import certifi
    except ImportError:
        return None
    return str(certifi.where())


@dataclass
class Reply:
    """A reply read whole (:meth:`HttpPool.get_whole`): what the checks of a reply read, and the body."""

    status: int
    headers: urllib3.HTTPHeaderDict
    body: bytearray


class Head(Protocol):
    """What the checks of a reply read: urllib3's reply, or a :class:`Reply` read whole."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


class HttpPool:
    """Pooled connections for one source: direct, or through the proxy the environment names
    (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``, as curl and requests read them).

    ``headers`` go with every request to every host: never put a credential there (a
    remote's own headers carry it, and are dropped on a redirect to another host)."""

    def __init__(self, opts: TransferOptions, *, headers: Mapping[str, str] | None = None,
                 ca_certs: str | None = None, proxies: bool = True) -> None:
        default = urllib3.HTTPHeaderDict({"Accept-Encoding": "identity", "User-Agent": f"weightship/{__version__}"})
        default.update(headers or {})  # case-insensitive: a caller's User-Agent replaces ours
        self.opts = opts
        self._kw: dict[str, Any] = {
            "maxsize": opts.connections * opts.parallel_files + 4, "block": False, "retries": False,
            "timeout": urllib3.Timeout(connect=min(30.0, opts.stall_timeout), read=opts.stall_timeout),
            "ca_certs": _ca_certs(ca_certs), "headers": default,
        }
        self._direct = urllib3.PoolManager(**self._kw)
        self._proxies = urllib.request.getproxies() if proxies else {}  # peers: never via a proxy
        self._via: dict[str, urllib3.ProxyManager] = {}
        self._curl: CurlLane | None = None  # made at the first whole GET (importing libcurl: 20 ms)
        self._curl_made = threading.Lock()

    def _proxy(self, url: str) -> str | None:
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        return None if not proxy or urllib.request.proxy_bypass(parts.hostname or "") else proxy

    def _manager(self, url: str) -> urllib3.PoolManager:
        proxy = self._proxy(url)
        if proxy is None:
            return self._direct
        if proxy not in self._via:
            self._via[proxy] = urllib3.ProxyManager(proxy, **self._kw)
        return self._via[proxy]

    def request(self, method: str, url: str, headers: Mapping[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        """Send a request and return as soon as the headers are in (the body is not read)."""
        manager = self._manager(url)
        return manager.request(method, url, headers={**manager.headers, **(headers or {})},
                               preload_content=False, decode_content=False, redirect=False)

    def get_whole(self, url: str, headers: Mapping[str, str], limit: int, where: str) -> Reply:
        """A GET read whole (a body of at most ``limit`` bytes) by libcurl (:mod:`.curl`): for a
        small file, about half the CPU of a request through urllib3."""
        lane = self._curl
        if lane is None:  # the first whole GET; the lock is not taken on every request
            with self._curl_made:
                if self._curl is None:
                    from weightship.fetch.curl import CurlLane

                    self._curl = CurlLane(self.opts, self._kw["headers"], self._kw["ca_certs"])
                lane = self._curl
        return lane.get(url, headers, limit, proxy=self._proxy(url), where=where)

    def close(self) -> None:
        """Close every pooled connection."""
        self._direct.clear()
        for m in self._via.values():
            m.clear()


def strong_etag(value: str | None) -> str | None:
    """A strong ETag, or None (a weak ``W/`` ETag says nothing about the bytes)."""
    if not value or value.startswith("W/"):
        return None
    return value


def raise_for_status(status: int, where: str) -> None:
    """Turn an error status into the matching weightship error."""
    if status < 400:
        return
    if status in _RETRYABLE_STATUS:
        raise TransientFetchError(f"{where}: HTTP {status}")
    if status in (401, 403):
        raise AccessDeniedError(where, f"HTTP {status} (access denied)",
                                hint="check the token or credentials for this server")
    if status in (404, 410):
        raise RemoteNotFoundError(where, f"HTTP {status} (not found)")
    if status == 412:
        raise RemoteChangedError(f"{where}: HTTP 412: the file changed while it was being read")
    if status == 416:
        raise FetchError(f"{where}: HTTP 416: the server has fewer bytes than planned")
    raise FetchError(f"{where}: HTTP {status}")


def transport_error(where: str, e: BaseException) -> FetchError:
    """The weightship error for a connection-level failure."""
    if isinstance(e, SSLError):
        return FetchError(f"{where}: TLS failed: {e}",
                          hint="set SSL_CERT_FILE to the CA bundle that signs this server's certificate")
    if isinstance(e, (TimeoutError, socket.timeout)):  # urllib3's, and the builtin one
        return TransientFetchError(f"{where}: stalled ({type(e).__name__}); reconnecting")
    return TransientFetchError(f"{where}: {type(e).__name__}: {e}")


def _raw(r: urllib3.BaseHTTPResponse) -> Any:
    """What a body is read from: http.client's response under urllib3's where there is one
    (we ask for no decoding, so the two give the same bytes), else urllib3's."""
    fp = getattr(r, "_fp", None)
    return fp if isinstance(fp, http.client.HTTPResponse) else r


def _finish(r: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back when its body was read to the end, else close it (a
    connection with unread bytes must never carry the next request)."""
    raw = _raw(r)
    # urllib3 counts what it read itself (None: a chunked body, whose end it did not see);
    # http.client closes its response once the body it read ends.
    if r.length_remaining != 0 and not (raw is not r and raw.isclosed()):
        r.close()
    elif raw is not r and not raw.isclosed():
        # No body left (a HEAD's reply, a 204), but http.client marks the reply done only when
        # it is read or closed; until then its connection refuses the next request
        # (ResponseNotReady). Closing the reply keeps the socket, which the pool reuses.
        raw.close()
    r.release_conn()


def get_small(pool: HttpPool, url: str, *, max_redirects: int = 5,
              where: str | None = None) -> bytes | None:
    """A small document (a manifest, a signature) at ``url``, following redirects; None when it
    is 404."""
    return read_small(HttpRemote(pool, url, max_redirects=max_redirects, where=where))


def read_small(remote: HttpRemote, *, missing_ok: bool = True) -> bytes | None:
    """The whole body of ``remote``, a small document: retried like a chunk when the reply fails
    or breaks mid-body; refused, not retried, when it is over 64 MiB; None when it is 404 and
    ``missing_ok`` (else the remote's own error for it)."""
    return with_retries(lambda: _read_small_once(remote, missing_ok), remote.pool.opts, remote.where)


def _read_small_once(remote: HttpRemote, missing_ok: bool) -> bytes | None:
    where = remote.where
    r = remote._follow("GET")
    try:
        if r.status == 404 and missing_ok:
            return None
        remote.check_status(r)
        body = r.read(SMALL_LIMIT + 1)
        length = r.headers.get("content-length")
        if length is not None and len(body) < min(parse_uint(length, "Content-Length", where),
                                                  SMALL_LIMIT + 1):
            # urllib3 hands back what arrived before the connection closed without a word
            raise TransientFetchError(f"{where}: body ended at byte {len(body)} of {length}")
    except (HTTPError, OSError, http.client.HTTPException) as e:
        if isinstance(e, FetchError):
            raise
        raise transport_error(where, e) from None  # IncompleteRead: the body broke off
    finally:
        _finish(r)
    if len(body) > SMALL_LIMIT:
        raise FetchError(f"{where}: larger than {SMALL_LIMIT} bytes")
    return body


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port made explicit: what credentials are bound to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"https": 443, "http": 80}.get(scheme)


class HttpRemote(RangeReader):
    """A file behind a URL, read by ranged GETs."""

    def __init__(self, pool: HttpPool, url: str, *, headers: Mapping[str, str] | None = None,
                 max_redirects: int = 5, where: str | None = None, if_match: bool = False) -> None:
        self.pool, self.url, self.headers = pool, url, dict(headers or {})
        self.where = where or url  # what errors call the file
        # Send the validator as If-Match where the server is known to honour it (S3). Off for
        # the Hub's CDN and plain web servers, untested here; every reply's ETag is compared anyway.
        self.if_match = if_match
        self._max_redirects = max_redirects
        self._size: int | None = None

    def request_url(self) -> str:
        """The URL for the next request (a subclass may sign each one)."""
        return self.url

    def check_status(self, r: Head) -> None:
        """Raise the weightship error for an error reply (a subclass may read more of it)."""
        raise_for_status(r.status, self.where)

    def check_reply(self, r: Head) -> None:
        """Check the headers of each reply, a redirect's included (the Hub's commit)."""

    def _request(self, method: str, url: str, headers: Mapping[str, str]) -> urllib3.BaseHTTPResponse:
        try:
            return self.pool.request(method, url, headers=headers)
        except HTTPError as e:
            raise transport_error(self.where, e) from None

    def _get(self, headers: Mapping[str, str]) -> urllib3.BaseHTTPResponse:
        return self._request("GET", self.request_url(), {**self.headers, **headers})

    def _send(self, method: str, url: str, headers: Mapping[str, str],
              whole: int | None) -> urllib3.BaseHTTPResponse | Reply:
        if whole is not None:
            return self.pool.get_whole(url, headers, whole, self.where)
        return self._request(method, url, headers)

    @overload
    def _follow(self, method: str) -> urllib3.BaseHTTPResponse: ...

    @overload
    def _follow(self, method: str, whole: int) -> Reply: ...

    def _follow(self, method: str, whole: int | None = None) -> urllib3.BaseHTTPResponse | Reply:
        """The reply to ``method``, redirects followed (by this module's rules); with ``whole``, a
        GET read whole, its body at most that many bytes (:meth:`HttpPool.get_whole`)."""
        url, headers = self.request_url(), dict(self.headers)
        for _ in range(self._max_redirects + 1):
            r = self._send(method, url, headers, whole)
            try:
                self.check_reply(r)
            except BaseException:
                if not isinstance(r, Reply):
                    r.close()
                raise
            location = r.headers.get("location")
            if r.status in (301, 302, 303, 307, 308) and location:
                if not isinstance(r, Reply):
                    r.drain_conn()
                    _finish(r)
                nxt = urljoin(url, location)
                if _origin(url)[0] == "https" and _origin(nxt)[0] != "https":
                    raise InsecureRedirectError(
                        f"{self.where}: the server redirected https to {_origin(nxt)[0]}://; "
                        "refusing to follow (it would expose the request and its credentials)",
                        hint="the server or a proxy is misconfigured; ask its operator")
                if _origin(nxt) != _origin(url):  # never leak a token to a CDN or a downgrade
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = nxt
                continue
            self.url, self.headers = url, headers
            return r
        raise FetchError(f"{self.where}: too many redirects")

    def stat(self) -> RemoteStat:
        r = self._follow("HEAD")
        _finish(r)
        if r.status in (405, 501):  # no HEAD: ask for the first byte instead
            return self._stat_by_get()
        self.check_status(r)
        length = r.headers.get("content-length")
        if length is None:
            return self._stat_by_get()
        self._size = parse_uint(length, "Content-Length", self.where)
        return RemoteStat(size=self._size, validator=strong_etag(r.headers.get("etag")))

    def _stat_by_get(self) -> RemoteStat:
        r = self._get({"Range": "bytes=0-0"})
        try:
            self.check_status(r)
            m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
            if r.status == 206 and m and m.group(3) != "*":
                self._size = parse_uint(m.group(3), "Content-Range size", self.where)
            elif r.status == 200 and r.headers.get("content-length") is not None:
                self._size = parse_uint(r.headers["content-length"], "Content-Length", self.where)
            else:
                raise FetchError(f"{self.where}: the server reports no size")
            return RemoteStat(size=self._size, validator=strong_etag(r.headers.get("etag")))
        finally:
            _finish(r)

    def read_all(self, size: int) -> memoryview:
        """The whole file in one GET, no HEAD first (its size came from the listing): a 200 with
        exactly ``size`` bytes, or an error (a short body is retryable)."""
        r = self._follow("GET", whole=size)
        self.check_status(r)
        if r.status != 200:
            raise ProtocolViolationError(f"{self.where}: HTTP {r.status} to a plain GET")
        length = r.headers.get("content-length")
        if length is not None and parse_uint(length, "Content-Length", self.where) != size:
            raise DigestMismatchError(self.where, expected=f"{size} bytes",
                                      actual=f"{length} bytes (as the server reports it)", what="size")
        if len(r.body) < size:
            raise TransientFetchError(f"{self.where}: body ended at byte {len(r.body)} of {size}")
        return memoryview(r.body)

    def read_range(self, start: int, end: int, validator: str | None, into: memoryview) -> Iterator[memoryview]:
        assert 0 <= start < end and len(into) == end - start, (start, end, len(into))
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if validator is not None and self.if_match:
            headers["If-Match"] = validator
        r = self._get(headers)
        try:
            self._check_range_reply(r, start, end, validator)
            yield from self._body(r, into, whole=False)
        finally:
            _finish(r)

    def read_whole(self, into: memoryview) -> Iterator[memoryview]:
        r = self._get({})
        try:
            self.check_status(r)
            if r.status != 200:
                raise ProtocolViolationError(f"{self.where}: HTTP {r.status} to a plain GET")
            yield from self._body(r, into, whole=True)
        finally:
            _finish(r)

    def _body(self, r: urllib3.BaseHTTPResponse, into: memoryview, *, whole: bool) -> Iterator[memoryview]:
        """Fill ``into`` from the body: views of it as they fill (reused from its start each
        time round when ``whole``). Stops at the end of the body or of ``into``."""
        pos = 0
        raw = _raw(r)
        while True:
            if pos == len(into):
                if not whole:
                    return
                pos = 0
            try:
                n = raw.readinto(into[pos:pos + _READ])
            except (HTTPError, OSError, http.client.HTTPException) as e:
                raise transport_error(self.where, e) from None
            if not n:
                return
            yield into[pos:pos + n]
            pos += n

    def _check_range_reply(self, r: urllib3.BaseHTTPResponse, start: int, end: int, validator: str | None) -> None:
        self.check_status(r)
        etag = strong_etag(r.headers.get("etag"))
        if validator is not None and etag is not None and etag != validator:
            raise RemoteChangedError(f"{self.where}: ETag changed from {validator} to {etag}")
        m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
        if r.status == 200 and m is None:
            raise RangeNotSupportedError(f"{self.where}: 200 to a ranged request")
        if r.status not in (200, 206):
            raise ProtocolViolationError(f"{self.where}: HTTP {r.status} to a ranged request")
        if not m or (parse_uint(m.group(1), "Content-Range start", self.where),
                     parse_uint(m.group(2), "Content-Range end", self.where) + 1) != (start, end):
            raise ProtocolViolationError(
                f"{self.where}: asked for bytes {start}-{end - 1}, got Content-Range "
                f"{r.headers.get('content-range')!r}")
        if self._size is not None and m.group(3) not in ("*", str(self._size)):
            raise RemoteChangedError(f"{self.where}: size changed from {self._size} to {m.group(3)}")
        length = r.headers.get("content-length")
        if (length is not None or r.status == 200) and length != str(end - start):
            raise ProtocolViolationError(
                f"{self.where}: Content-Length {length} for a range of {end - start} bytes")
