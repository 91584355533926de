"""Byte counts in a hostile server's headers (Content-Length, Content-Range) are refused with the
typed lying-server error, never a ValueError or a huge int."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.fetch.webserver import running
from weightship.errors import ProtocolViolationError
from weightship.fetch.options import TransferOptions
from weightship.fetch.transport import HttpPool, HttpRemote, get_small

HUGE = "9" * 5000  # int() of it raises ValueError (more than 4300 digits)
OPTS = TransferOptions(retries=0, backoff=0.001, backoff_max=0.002)


class _Liar(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.head_status = 200
        self.status = 200
        self.headers_to_send: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/f.bin"


class _Handler(BaseHTTPRequestHandler):
    server: _Liar
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(self.server.head_status if self.command == "HEAD" else self.server.status)
        for k, v in self.server.headers_to_send.items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"x" * 10)

    do_HEAD = do_GET


@pytest.fixture
def liar() -> Iterator[_Liar]:
    with running(_Liar()) as server:
        yield server


def _stat(r: HttpRemote) -> object:
    return r.stat()


def _all(r: HttpRemote) -> object:
    return r.read_all(10)


def _range(r: HttpRemote) -> object:
    return list(r.read_range(0, 10, None, memoryview(bytearray(10))))


@pytest.mark.parametrize("value", [HUGE, "12abc", "\u00b2", "-1"])
@pytest.mark.parametrize("call", [_stat, _all])
def test_a_hostile_content_length_is_a_protocol_violation(
        liar: _Liar, value: str, call: Callable[[HttpRemote], object]) -> None:
    liar.headers_to_send = {"Content-Length": value}
    # libcurl (a whole GET's transport) refuses what it cannot parse in its own words
    with pytest.raises(ProtocolViolationError,
                       match=r"Content-Length .* is not a byte count|Invalid Content-Length") as e:
        call(HttpRemote(HttpPool(OPTS), liar.url))
    assert len(str(e.value)) < 200 and "\n" not in str(e.value)


@pytest.mark.parametrize("content_range", [f"bytes 0-0/{HUGE}", f"bytes {HUGE}-0/10", f"bytes 0-{HUGE}/10"])
def test_a_hostile_content_range_is_a_protocol_violation(liar: _Liar, content_range: str) -> None:
    liar.head_status = 405  # no HEAD: the size comes from a one-byte ranged GET
    liar.status = 206
    liar.headers_to_send = {"Content-Range": content_range, "Content-Length": "1"}
    remote = HttpRemote(HttpPool(OPTS), liar.url)
    with pytest.raises(ProtocolViolationError, match=r"Content-Range .* is not a byte count"):
        remote.stat() if content_range.endswith(HUGE) else _range(remote)


def test_a_hostile_content_length_on_a_small_document(liar: _Liar) -> None:
    liar.headers_to_send = {"Content-Length": HUGE}
    with pytest.raises(ProtocolViolationError, match="is not a byte count"):
        get_small(HttpPool(OPTS), liar.url)
