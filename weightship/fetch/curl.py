"""Whole small bodies in one GET through libcurl (pycurl): the transport of a small file's read.

A fetch of thousands of small files is bound by the client's CPU per request, not by bytes.
Through urllib3 each request parses its status line and headers in Python (http.client) and
hands the GIL between the request threads on every socket call; libcurl sends the request and
reads the whole reply in C with the GIL released. Measured on 2,000 objects of 2 KiB (bench/
transport.py --objects, bench/RESULTS.md): 0.70 CPU-ms per object for libcurl, 1.39 for urllib3.

Only the sending is libcurl's. What a reply must be is still checked by the remote that asked
(:meth:`~weightship.fetch.transport.HttpRemote.read_all`: its status, size and the headers its
source checks, a redirect followed or refused by the same rules), from the :class:`Reply` this
module returns. libcurl follows no redirect, sends only what it is given (no proxy, CA bundle or
credential from its own defaults: the pool's choices are passed on), speaks HTTP/1.1 and HTTPS
only, and gives up a reply that stays silent for the pool's stall time.

Each thread keeps its own handle and so its own kept-alive connections.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Mapping

import pycurl
import urllib3

from weightship.errors import DigestMismatchError, FetchError, ProtocolViolationError, TransientFetchError
from weightship.fetch.options import TransferOptions
from weightship.fetch.transport import Reply

# libcurl's errors that no retry will change: the certificate, the CA bundle, the URL
_TLS_ERRORS = {pycurl.E_SSL_CACERT_BADFILE, pycurl.E_PEER_FAILED_VERIFICATION, pycurl.E_SSL_CERTPROBLEM,
               pycurl.E_SSL_ISSUER_ERROR, pycurl.E_SSL_CIPHER}
_TIMEOUT = pycurl.E_OPERATION_TIMEDOUT
_MALFORMED = pycurl.E_FTP_WEIRD_SERVER_REPLY  # (CURLE_WEIRD_SERVER_REPLY) a reply libcurl cannot parse
_TOO_LONG = pycurl.E_WRITE_ERROR  # our write callback refused a byte past the expected size


class CurlLane:
    """Whole GETs with libcurl for one :class:`~weightship.fetch.transport.HttpPool`: its default
    headers, CA bundle, proxy choice and stall time."""

    def __init__(self, opts: TransferOptions, headers: Mapping[str, str], ca_certs: str | None) -> None:
        self.headers = dict(headers)
        self.stall = max(1, round(opts.stall_timeout))
        self.connect = max(1, round(min(30.0, opts.stall_timeout)))
        # The pool's bundle (SSL_CERT_FILE, certifi's…), else the system's as Python finds it
        # (None where missing): the wheel's libcurl was built elsewhere, its defaults may not exist here.
        system = ssl.get_default_verify_paths()
        self.cainfo = ca_certs or system.cafile
        self.capath = None if ca_certs else system.capath
        self._local = threading.local()

    def _handle(self) -> pycurl.Curl:
        c: pycurl.Curl | None = getattr(self._local, "curl", None)
        if c is None:
            c = self._local.curl = pycurl.Curl()
            c.setopt(pycurl.NOSIGNAL, 1)
            c.setopt(pycurl.FOLLOWLOCATION, 0)
            c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
            c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
            c.setopt(pycurl.TCP_NODELAY, 1)
            c.setopt(pycurl.CONNECTTIMEOUT, self.connect)
            c.setopt(pycurl.LOW_SPEED_LIMIT, 1)  # bytes a second, over LOW_SPEED_TIME: a stall
            c.setopt(pycurl.LOW_SPEED_TIME, self.stall)
            c.setopt(pycurl.ACCEPT_ENCODING, None)  # no decoding: the bytes hashed are the bytes sent
            c.setopt(pycurl.SSL_VERIFYPEER, 1)
            c.setopt(pycurl.SSL_VERIFYHOST, 2)
            if self.cainfo:
                c.setopt(pycurl.CAINFO, self.cainfo)
            if self.capath:
                c.setopt(pycurl.CAPATH, self.capath)
        return c

    def get(self, url: str, headers: Mapping[str, str], limit: int, *, proxy: str | None,
            where: str) -> Reply:
        """GET ``url`` whole, the body at most ``limit`` bytes (one more is refused as a
        :class:`DigestMismatchError` of size); through ``proxy`` (None: directly)."""
        c = self._handle()
        body = bytearray()
        lines: list[bytes] = []

        def write(data: bytes) -> int | None:
            if not _is_ok(lines):
                return None  # an error's or a redirect's body: not the file, not kept
            if len(body) + len(data) > limit:
                return 0  # libcurl stops with E_WRITE_ERROR
            body.extend(data)
            return None

        sent = {**self.headers, **headers}
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in sent.items()])
        c.setopt(pycurl.PROXY, proxy or "")  # "": no proxy, whatever the environment says
        c.setopt(pycurl.WRITEFUNCTION, write)
        c.setopt(pycurl.HEADERFUNCTION, lines.append)
        try:
            c.perform()
        except pycurl.error as e:
            code, message = e.args[0], str(e.args[1])
            if code == _TOO_LONG:
                raise DigestMismatchError(where, expected=f"at most {limit} bytes", actual="more",
                                          what="size") from None
            if code in _TLS_ERRORS:
                raise FetchError(f"{where}: TLS failed: {message}", hint="set SSL_CERT_FILE to the CA "
                                 "bundle that signs this server's certificate") from None
            if code == _MALFORMED:
                raise ProtocolViolationError(f"{where}: {message}") from None
            if code == _TIMEOUT:
                raise TransientFetchError(f"{where}: stalled ({message}); reconnecting") from None
            raise TransientFetchError(f"{where}: {message}") from None
        finally:
            c.setopt(pycurl.WRITEFUNCTION, _discard)  # drop the closures (and the body) now
            c.setopt(pycurl.HEADERFUNCTION, _discard)
        return Reply(status=int(c.getinfo(pycurl.RESPONSE_CODE)), headers=_parse(lines), body=body)


def _discard(data: bytes) -> None:
    return None


def _is_ok(lines: list[bytes]) -> bool:
    """Whether the reply whose header lines these are is a ``200``."""
    status = next((line for line in reversed(lines) if line.startswith(b"HTTP/")), b"")
    return status.split(b" ", 2)[1:2] == [b"200"]


def _parse(lines: list[bytes]) -> urllib3.HTTPHeaderDict:
    """The header fields of the last response in ``lines`` (libcurl passes each line as it came)."""
    headers = urllib3.HTTPHeaderDict()
    for raw in lines:
        line = raw.decode("latin-1").rstrip("\r\n")
        if line.startswith("HTTP/"):
            headers = urllib3.HTTPHeaderDict()  # an interim reply's fields are not the reply's
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    return headers
