"""HTTP(S) transport for the download engine: one remote file read by ranged GETs.

A server's reply is checked against the request before a byte is used: a ranged GET must come
back ``206`` with a ``Content-Range`` for exactly the bytes asked for, a ``Content-Length`` that
agrees, and the ETag the download started with. A ``200`` to a ranged request means the server
ignores ranges (the engine then reads the file whole); a short body, a wrong range or a 5xx is
retryable; 401/403/404/416 are not. The Hub's ``resolve`` URLs redirect to a CDN: redirects are
followed once, at :meth:`HttpRemote.stat`, and the final URL is used for every range.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping

import httpx

from weightship.errors import (
    AccessDeniedError,
    FetchError,
    ProtocolViolationError,
    RangeNotSupportedError,
    RemoteChangedError,
    RemoteNotFoundError,
    TransientFetchError,
)
from weightship.fetch.download import RangeReader, RemoteStat, TransferOptions

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_READ = 1 << 20
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


def make_client(opts: TransferOptions, *, headers: Mapping[str, str] | None = None) -> httpx.Client:
    """An HTTP client sized for ``opts`` (one pooled connection per concurrent range)."""
    conns = opts.connections * opts.parallel_files + 4
    return httpx.Client(
        headers={"Accept-Encoding": "identity", **(headers or {})},
        timeout=httpx.Timeout(connect=min(30.0, opts.stall_timeout), read=opts.stall_timeout,
                              write=opts.stall_timeout, pool=None),
        limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
        follow_redirects=False,
    )


def strong_etag(value: str | None) -> str | None:
    """A strong ETag, or None (a weak ``W/`` ETag says nothing about the bytes)."""
    if not value or value.startswith("W/"):
        return None
    return value


def raise_for_status(r: httpx.Response, url: str) -> None:
    """Turn an error status into the matching weightship error."""
    code = r.status_code
    if code < 400:
        return
    if code in _RETRYABLE_STATUS:
        raise TransientFetchError(f"{url}: HTTP {code}")
    if code in (401, 403):
        raise AccessDeniedError(f"{url}: HTTP {code} (access denied)",
                                hint="check the token or credentials for this server")
    if code in (404, 410):
        raise RemoteNotFoundError(f"{url}: HTTP {code} (not found)")
    if code == 416:
        raise FetchError(f"{url}: HTTP 416: the server has fewer bytes than planned")
    raise FetchError(f"{url}: HTTP {code}")


def _transport_error(url: str, e: httpx.HTTPError) -> TransientFetchError:
    if isinstance(e, httpx.TimeoutException):
        return TransientFetchError(f"{url}: stalled ({type(e).__name__}); reconnecting")
    return TransientFetchError(f"{url}: {type(e).__name__}: {e}")


class HttpRemote(RangeReader):
    """A file behind a URL, read by ranged GETs."""

    def __init__(self, client: httpx.Client, url: str, *, headers: Mapping[str, str] | None = None,
                 max_redirects: int = 5) -> None:
        self.client, self.url, self.headers = client, url, dict(headers or {})
        self._max_redirects = max_redirects
        self._size: int | None = None

    def _follow(self, method: str) -> httpx.Response:
        url, headers = self.url, dict(self.headers)
        for _ in range(self._max_redirects + 1):
            try:
                r = self.client.request(method, url, headers=headers)
            except httpx.HTTPError as e:
                raise _transport_error(url, e) from None
            if r.is_redirect and "location" in r.headers:
                nxt = str(r.url.join(r.headers["location"]))
                if httpx.URL(nxt).host != httpx.URL(url).host:
                    headers.pop("authorization", None)
                    headers.pop("Authorization", None)  # never leak a token to a CDN
                url = nxt
                continue
            self.url, self.headers = url, headers
            return r
        raise FetchError(f"{self.url}: too many redirects")

    def stat(self) -> RemoteStat:
        r = self._follow("HEAD")
        if r.status_code in (405, 501):  # no HEAD: ask for the first byte instead
            return self._stat_by_get()
        raise_for_status(r, self.url)
        length = r.headers.get("content-length")
        if length is None or not length.isdigit():
            return self._stat_by_get()
        self._size = int(length)
        return RemoteStat(size=self._size, validator=strong_etag(r.headers.get("etag")))

    def _stat_by_get(self) -> RemoteStat:
        try:
            with self.client.stream("GET", self.url, headers={**self.headers, "Range": "bytes=0-0"}) as r:
                raise_for_status(r, self.url)
                m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
                if r.status_code == 206 and m and m.group(3) != "*":
                    self._size = int(m.group(3))
                elif r.status_code == 200 and (r.headers.get("content-length") or "").isdigit():
                    self._size = int(r.headers["content-length"])
                else:
                    raise FetchError(f"{self.url}: the server reports no size")
                return RemoteStat(size=self._size, validator=strong_etag(r.headers.get("etag")))
        except httpx.HTTPError as e:
            raise _transport_error(self.url, e) from None

    def read_range(self, start: int, end: int, validator: str | None) -> Iterator[bytes]:
        assert 0 <= start < end, (start, end)
        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}"}
        try:
            with self.client.stream("GET", self.url, headers=headers) as r:
                self._check_range_reply(r, start, end, validator)
                yield from _body(r, end - start)
        except httpx.HTTPError as e:
            raise _transport_error(self.url, e) from None

    def read_whole(self) -> Iterator[bytes]:
        try:
            with self.client.stream("GET", self.url, headers=self.headers) as r:
                raise_for_status(r, self.url)
                if r.status_code != 200:
                    raise ProtocolViolationError(f"{self.url}: HTTP {r.status_code} to a plain GET")
                yield from _body(r, self._size)
        except httpx.HTTPError as e:
            raise _transport_error(self.url, e) from None

    def _check_range_reply(self, r: httpx.Response, start: int, end: int, validator: str | None) -> None:
        raise_for_status(r, self.url)
        etag = strong_etag(r.headers.get("etag"))
        if validator is not None and etag is not None and etag != validator:
            raise RemoteChangedError(f"{self.url}: ETag changed from {validator} to {etag}")
        if r.status_code == 200:
            raise RangeNotSupportedError(f"{self.url}: 200 to a ranged request")
        if r.status_code != 206:
            raise ProtocolViolationError(f"{self.url}: HTTP {r.status_code} to a ranged request")
        m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
        if not m or (int(m.group(1)), int(m.group(2)) + 1) != (start, end):
            raise ProtocolViolationError(
                f"{self.url}: asked for bytes {start}-{end - 1}, got Content-Range "
                f"{r.headers.get('content-range')!r}")
        if self._size is not None and m.group(3) not in ("*", str(self._size)):
            raise RemoteChangedError(f"{self.url}: size changed from {self._size} to {m.group(3)}")
        length = r.headers.get("content-length")
        if length is not None and length != str(end - start):
            raise ProtocolViolationError(
                f"{self.url}: Content-Length {length} for a range of {end - start} bytes")


def _body(r: httpx.Response, expected: int | None) -> Iterator[bytes]:
    got = 0
    for piece in r.iter_raw(_READ):
        got += len(piece)
        if expected is not None and got > expected:
            raise ProtocolViolationError(f"{r.url}: body longer than {expected} bytes")
        yield piece
