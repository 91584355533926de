"""The peer server hands out bytes of registered files only, by digest, within the chunks the
node has: no path a peer sends can reach any other file. A fetch registers only the files of
its plan, by their trusted digests."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fetch.webserver import FileServer
from tests.net import free_port, listening, wait_until
from weightship.manifest import Manifest
from weightship.swarm.board import Board
from weightship.swarm.mesh import Mesh
from weightship.swarm.protocol import BLOB_PATH, CHUNK_HEADER, EVENTS_PATH, STREAM_TYPE, chunk_digest
from weightship.swarm.server import PeerServer, _Handler
from weightship.torrent.peers import PeerSource

CHUNK = 4096


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[PeerServer, bytes, str]]:
    """A node sharing a partial file: chunks 0 and 2 of 4 are there, 1 and 3 are not."""
    data = os.urandom(4 * CHUNK)
    f = tmp_path / "partial"
    f.write_bytes(data)
    (tmp_path / "secret").write_bytes(b"not shared")
    sha = hashlib.sha256(data).hexdigest()
    board = Board("node-a")
    board.share(sha, len(data), CHUNK, os.open(f, os.O_RDONLY))
    for i in (0, 2):
        board.have(sha, i, "node-a", chunk_digest(data[i * CHUNK:(i + 1) * CHUNK]))
    server = PeerServer(board, "127.0.0.1", 0).start()
    try:
        yield server, data, sha
    finally:
        board.close()
        server.stop()


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read(), r.headers
    finally:
        conn.close()


def test_chunks_it_has_are_served_with_what_it_vouches_for(served: tuple[PeerServer, bytes, str]) -> None:
    server, data, sha = served
    status, body, headers = _get(server.port, BLOB_PATH + sha, {"Range": f"bytes={2 * CHUNK}-{3 * CHUNK - 1}"})
    assert status == 206 and body == data[2 * CHUNK:3 * CHUNK]
    assert headers[CHUNK_HEADER] == f"node-a {chunk_digest(body)}"
    # a range within a chunk it has, too
    assert _get(server.port, BLOB_PATH + sha, {"Range": "bytes=10-19"})[1] == data[10:20]


def test_listening_asks_no_name_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """http.server looks up the listen address's host name when it binds; on a node whose name
    server does not answer (an on-prem host with DNS cut off) that held every swarm fetch for
    10 s before it served or fetched a byte."""
    def lookup(*args: object) -> str:
        raise AssertionError(f"looked up a host name: {args}")

    monkeypatch.setattr(socket, "getfqdn", lookup)
    server = PeerServer(Board("node-a"), "127.0.0.1", 0).start()
    try:
        assert _get(server.port, EVENTS_PATH)[0] == 200
    finally:
        server.stop()


def test_a_dropped_chunk_is_written_again_only_once_no_reply_reads_it(served: tuple[PeerServer, bytes, str]) -> None:
    """A chunk found bad is dropped and fetched again into the same file: a reply still sending
    it must end first, or it would send new bytes under the old digest, and the peer reading it
    would ban this node for a lie it did not tell."""
    server, data, sha = served
    board = server.board
    with board.reading(sha, 2 * CHUNK, 3 * CHUNK) as reading:  # a reply sending chunk 2
        assert reading is not None
        drop = threading.Thread(target=board.drop, args=(sha, {2}))
        drop.start()
        drop.join(0.5)
        assert drop.is_alive()  # waits for the reply
        # and no reply starts on it meanwhile; the other chunk is still served
        assert _get(server.port, BLOB_PATH + sha, {"Range": f"bytes={2 * CHUNK}-{3 * CHUNK - 1}"})[0] == 416
        assert _get(server.port, BLOB_PATH + sha, {"Range": f"bytes=0-{CHUNK - 1}"})[1] == data[:CHUNK]
    drop.join(10)
    assert not drop.is_alive()


@pytest.mark.parametrize("span", [f"bytes={CHUNK}-{2 * CHUNK - 1}", f"bytes=0-{2 * CHUNK}", "bytes=0-0,8-9",
                                  f"bytes=0-{4 * CHUNK}", "bytes=-10", ""])
def test_chunks_it_lacks_and_odd_ranges_are_refused(served: tuple[PeerServer, bytes, str], span: str) -> None:
    server, _, sha = served
    status, body, _ = _get(server.port, BLOB_PATH + sha, {"Range": span} if span else {})
    assert status == 416 and len(body) < 100


def test_a_file_it_did_not_register_is_not_served_whatever_it_holds(served: tuple[PeerServer, bytes, str],
                                                                    tmp_path: Path) -> None:
    server, _, _ = served
    other = hashlib.sha256((tmp_path / "secret").read_bytes()).hexdigest()
    assert _get(server.port, BLOB_PATH + other, {"Range": "bytes=0-3"})[0] == 404


def test_a_node_of_the_first_protocol_finds_this_one_absent(served: tuple[PeerServer, bytes, str]) -> None:
    """Version 1 digested chunks with sha256, version 2 with BLAKE3: the old paths get a 404, so
    neither version ever compares the other's digests (and bans an honest node for them)."""
    server, _, sha = served
    assert _get(server.port, "/swarm/v1/events?since=0&wait=0")[0] == 404
    assert _get(server.port, "/swarm/v1/blob/" + sha, {"Range": "bytes=0-3"})[0] == 404
    assert _get(server.port, BLOB_PATH + sha, {"Range": "bytes=0-3"})[0] == 206


@pytest.mark.parametrize("path", [
    "/etc/passwd", BLOB_PATH + "../../../etc/passwd", BLOB_PATH + "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/swarm/v2/blob/..%2f..%2fsecret", "//etc/passwd", "/swarm/v2/blob/secret", "/swarm/v2/blob/",
    "/swarm/v2/../v1/blob/x", "/./secret", "/secret", "/partial",
])
def test_no_path_reaches_a_file(served: tuple[PeerServer, bytes, str], path: str) -> None:
    server, _, _ = served
    status, body, _ = _get(server.port, path, {"Range": "bytes=0-3"})
    assert status == 404 and b"not shared" not in body


@settings(max_examples=200, deadline=None)
@given(path=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=120))
def test_any_path_but_a_registered_digest_gets_no_bytes(path: str) -> None:
    # the server built once for all examples (hypothesis and function fixtures do not mix)
    server, data, sha = _SHARED
    target = "/" + path.lstrip("/")
    status, body, _ = _get(server.port, target, {"Range": "bytes=0-15"})
    if urlsplit(target).path == BLOB_PATH + sha:
        assert status == 206
    else:
        assert status in (400, 404) or (status == 200 and urlsplit(target).path == EVENTS_PATH)
        assert data[:16] not in body


class _PollsOnlyHandler(_Handler):
    """The events as a long poll whatever the reader asks (a server from before streams)."""

    requests = 0

    def _stream(self, board: Board, since: int, wait: float, reader: str) -> None:
        type(self).requests += 1
        nxt, events = board.events(since, wait)
        self._reply(200, json.dumps({"v": 1, "node": board.node, "epoch": board.epoch, "next": nxt,
                                     "events": events}).encode(), "application/json")


def _shared_server() -> tuple[PeerServer, bytes, str]:
    data = os.urandom(CHUNK)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    sha = hashlib.sha256(data).hexdigest()
    board = Board("node-h")
    board.share(sha, len(data), CHUNK, os.open(f.name, os.O_RDONLY))
    os.unlink(f.name)
    board.done(sha)
    return PeerServer(board, "127.0.0.1", 0).start(), data, sha


_SHARED = _shared_server()


def test_a_fetch_shares_only_the_files_of_its_plan(tmp_path: Path) -> None:
    """A node fetching one file of a model (``--include``) into a directory that holds other
    files shares that file's digest only: not the model's other file, not the manifest, not a
    file that was in the directory before."""
    from weightship.manifest import create_for_directory

    model = tmp_path / "origin" / "m"
    model.mkdir(parents=True)
    (model / "a.safetensors").write_bytes(os.urandom(3 << 20))
    (model / "b.safetensors").write_bytes(os.urandom(1 << 20))
    create_for_directory(model, name="m").write(model)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_bytes(b"private notes")
    origin = FileServer(tmp_path / "origin")
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "weightship", "--json", "fetch", origin.url + "m/", "--to", dest,
                             "--manifest", model / ".weightship/manifest.json", "--include", "a.safetensors",
                             "--chunk-mib", "1", "--listen", f"127.0.0.1:{port}", "--seed-for", "60s"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_until(lambda: (dest / ".weightship/manifest.json").exists(), 60, "the fetch to verify", proc)  # type: ignore[arg-type]
        wait_until(lambda: listening(port), 10, "the peer server")
        status, body, _ = _get(port, f"{EVENTS_PATH}?since=0&wait=0")
        shared = {e[1] for e in json.loads(body)["events"] if e[0] == "file"}
        digests = {f.path: f.sha256 for f in Manifest.load(model).files}
        assert shared == {digests["a.safetensors"]}
        for other in (hashlib.sha256((model / "b.safetensors").read_bytes()).hexdigest(),
                      hashlib.sha256((dest / ".weightship/manifest.json").read_bytes()).hexdigest(),
                      hashlib.sha256(b"private notes").hexdigest()):
            assert _get(port, BLOB_PATH + other, {"Range": "bytes=0-3"})[0] == 404
        status, body, _ = _get(port, BLOB_PATH + digests["a.safetensors"], {"Range": "bytes=0-1023"})
        assert status == 206 and body == (model / "a.safetensors").read_bytes()[:1024]
    finally:
        proc.terminate()
        proc.wait(10)
        origin.shutdown()


def test_events_stream_a_line_per_news_as_it_happens(served: tuple[PeerServer, bytes, str]) -> None:
    """A reader's stream gets what was there at once, then each new event on its own line
    without asking again; the node counts what the reader has been sent as seen."""
    server, data, sha = served
    board = server.board
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", f"{EVENTS_PATH}?since=0&wait=5&node=reader-1&stream=1")
        r = conn.getresponse()
        assert r.status == 200 and r.headers["Content-Type"] == STREAM_TYPE
        first = json.loads(r.readline())
        assert [e[0] for e in first["events"]] == ["file", "have", "have"] and first["next"] == 3
        assert board.wait_seen({"reader-1"}, timeout=5)
        started = time.monotonic()
        board.have(sha, 1, "node-a", chunk_digest(data[CHUNK:2 * CHUNK]))
        second = json.loads(r.readline())
        assert time.monotonic() - started < 2  # not held for the 5 s an idle stream waits
        assert second["events"] == [["have", sha, 1, "node-a", chunk_digest(data[CHUNK:2 * CHUNK])]]
        assert second["next"] == 4 and second["epoch"] == first["epoch"]
        assert board.wait_seen({"reader-1"}, timeout=5)
    finally:
        conn.close()


def test_a_peer_that_answers_long_polls_only_is_still_read(tmp_path: Path) -> None:
    """A peer whose server knows no streams (one reply per request, as before them) is read by
    asking again from its ``next``: news of it still arrives."""

    class PollsOnly(PeerServer):
        def finish_request(self, request: Any, client_address: Any) -> None:
            _PollsOnlyHandler(request, client_address, self)

    board = Board("old-node")
    sha = "ab" * 32
    board.share(sha, 4 * CHUNK, CHUNK, os.open(os.devnull, os.O_RDONLY))
    server = PollsOnly(board, "127.0.0.1", 0).start()
    mesh = Mesh("new-node", PeerSource.from_options((f"127.0.0.1:{server.port}",), None)).start()
    try:
        for i in range(4):
            board.have(sha, i, "old-node", "cd" * 32)
            started = time.monotonic()
            with mesh.cond:
                while not any(sha in p.files and i in p.files[sha].have for p in mesh.usable()):
                    assert time.monotonic() - started < 1.5, f"news of chunk {i} not read"
                    mesh.wait_chunk(sha, i, 0.1)
        assert _PollsOnlyHandler.requests >= 4
    finally:
        mesh.close()
        board.close()
        server.stop()


def test_an_events_stream_asked_not_to_wait_is_no_flood(served: tuple[PeerServer, bytes, str]) -> None:
    """``wait=0`` on a stream still spaces its empty lines: a reader cannot make a node spin."""
    server, _, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", f"{EVENTS_PATH}?since=0&wait=0&stream=1")
        r = conn.getresponse()
        r.readline()  # what there is
        started = time.monotonic()
        lines = 0
        while time.monotonic() - started < 1.2:
            assert json.loads(r.readline())["events"] == []
            lines += 1
        assert lines <= 4, lines
    finally:
        conn.close()
