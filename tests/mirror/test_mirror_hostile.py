"""``weightship mirror`` against hostile and odd clients: every request that is not a good one
gets a clean 4xx (never a 500, never a traceback in the mirror's log), ``paths-info`` works with
the real huggingface_hub client, and ``/healthz`` tells nothing to a caller without a token.

The mirror is the real command (``python -m weightship mirror … --token-file``), its log kept in
a file; requests are raw HTTP (``http.client``, or a socket where the bytes are not even valid
in a URL)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile, RepoFolder

from tests.net import free_port, listening, wait_until
from weightship.manifest import Manifest, create_for_directory

TOKEN = "s3cret-token"
UTF8_TOKEN = "jeton-\u00e9t\u00e9"  # a token file may hold any UTF-8; clients send its bytes
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Mirror:
    port: int
    log: Path
    since: int = 0  # where the current test's part of the log begins

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: (status, headers with lower-case names, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def raw(self, request: bytes) -> bytes:
        """Send ``request`` bytes as they are; the status line of the answer (b"" if none)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(request)
            answer = b""
            while b"\r\n" not in answer and (data := s.recv(4096)):
                answer += data
        return answer.split(b"\r\n", 1)[0]

    def assert_log_clean(self) -> None:
        """No traceback in what the mirror logged during this test."""
        with self.log.open("rb") as f:
            f.seek(self.since)
            text = f.read().decode(errors="replace")
        assert "Traceback" not in text and "Exception in ASGI" not in text, text[-3000:]


@pytest.fixture(scope="module")
def root(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mirror root: ``weightship/tiny``, and ``weightship/nested`` with a folder."""
    root = tmp_path_factory.mktemp("hostile-root")
    shutil.copytree(tiny_hf_dir, root / "weightship" / "tiny", copy_function=os.link)
    nested = root / "weightship" / "nested"
    (nested / "sub").mkdir(parents=True)
    (nested / "config.json").write_text('{"model_type": "mistral"}\n')
    (nested / "sub" / "notes.txt").write_text("a file in a folder\n")
    create_for_directory(nested, name="nested").write(nested)
    return root


@pytest.fixture(scope="module")
def mirror(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    """``weightship mirror`` with a token file, run as the command a user runs."""
    work = tmp_path_factory.mktemp("hostile-mirror")
    (work / "tokens").write_text(f"# the tokens\n{TOKEN}\n{UTF8_TOKEN}\n", encoding="utf-8")
    log = work / "mirror.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "weightship", "mirror", str(root),
                                 "--port", str(port), "--token-file", str(work / "tokens")],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: listening(port), 60, "the mirror to listen", proc)
        yield Mirror(port, log)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True)
def _log_of_this_test(mirror: Mirror) -> None:
    mirror.since = mirror.log.stat().st_size


def _ascii_header(headers: dict[str, str], name: str) -> str:
    value = headers[name]
    assert value.isascii() and value.isprintable(), value
    return value


def test_a_non_ascii_bearer_token_is_refused_not_a_crash(mirror: Mirror) -> None:
    # (a NUL is no valid header byte at all: the HTTP parser answers 400 before the mirror)
    for token, want in ((b"\xe2\x80\xa6", b"401 Unauthorized"), (b"s3cret-token\xff", b"401 Unauthorized"),
                        ("\u00e9".encode("latin-1"), b"401 Unauthorized"), (b"\x00", b"400 Bad Request")):
        status = mirror.raw(b"GET /api/models/weightship/tiny HTTP/1.1\r\nHost: m\r\n"
                            b"Authorization: Bearer " + token + b"\r\nConnection: close\r\n\r\n")
        assert status == b"HTTP/1.1 " + want, (token, status)
    # the right tokens still work on the same server, a UTF-8 one as the bytes a client sends
    assert mirror.request("GET", "/api/models/weightship/tiny", AUTH)[0] == 200
    status = mirror.raw(b"GET /api/models/weightship/tiny HTTP/1.1\r\nHost: m\r\nAuthorization: "
                        b"Bearer " + UTF8_TOKEN.encode() + b"\r\nConnection: close\r\n\r\n")
    assert status == b"HTTP/1.1 200 OK"
    mirror.assert_log_clean()


@pytest.mark.parametrize(("path", "auth", "status", "code"), [
    ("/api/models/%E2%80%A6/x", False, 401, "GatedRepo"),  # refused before any lookup
    ("/api/models/weightship/%E2%80%A6", True, 404, "RepoNotFound"),
    ("/api/models/weightship/tiny/revision/%E2%80%A6", True, 404, "RevisionNotFound"),
    ("/weightship/tiny/resolve/main/%E2%80%A6.json", False, 401, "GatedRepo"),
    ("/weightship/tiny/resolve/main/%E2%80%A6.json", True, 404, "EntryNotFound"),
    ("/weightship/tiny/resolve/main/a%0Db", True, 404, "EntryNotFound"),  # no header injection
    ("/api/models/weightship/tiny/tree/main/a%00b", True, 404, "EntryNotFound"),
    ("/api/models/a%00b/c", False, 401, "GatedRepo"),
], ids=["repo-unauthenticated", "repo", "revision", "path-unauthenticated", "path",
        "path-with-cr", "tree-with-nul", "repo-with-nul-unauthenticated"])
def test_a_repo_id_or_path_outside_latin1_is_a_clean_4xx(mirror: Mirror, path: str, auth: bool,
                                                         status: int, code: str) -> None:
    got, headers, body = mirror.request("GET", path, AUTH if auth else None)
    assert got == status, body[:300]
    assert headers["x-error-code"] == code
    message = _ascii_header(headers, "x-error-message")
    assert "\\u2026" in message or "\\x00" in message or "\\r" in message or "token" in message
    assert json.loads(body)["error"]  # the JSON body keeps the message as it was
    mirror.assert_log_clean()


def test_raw_non_ascii_bytes_in_the_request_line_are_a_400(mirror: Mirror) -> None:
    for target in ("/weightship/tiny/resolve/main/\u2026".encode(), "/api/models/\u00e9t\u00e9".encode()):
        status = mirror.raw(b"GET " + target + b" HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 400"), status
    mirror.assert_log_clean()


def test_a_range_number_too_large_to_parse_is_answered_per_rfc(mirror: Mirror, root: Path) -> None:
    data = (root / "weightship" / "tiny" / "config.json").read_bytes()
    url = "/weightship/tiny/resolve/main/config.json"
    huge = "9" * 5000
    status, headers, _ = mirror.request("GET", url, {**AUTH, "Range": f"bytes={huge}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
    status, _, _ = mirror.request("GET", url, {**AUTH, "Range": f"bytes={huge}-{huge}"})
    assert status == 416
    # a last position past the end means "to the end"; a huge suffix means "all of it"
    for spec in (f"bytes=0-{huge}", f"bytes=-{huge}"):
        status, headers, body = mirror.request("GET", url, {**AUTH, "Range": spec})
        assert status == 206 and body == data
        assert headers["content-range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    status, _, body = mirror.request("GET", url, {**AUTH, "Range": f"bytes=1-{'0' * 4999}2"})
    assert status == 206 and body == data[1:3]  # leading zeros are only zeros
    mirror.assert_log_clean()


def test_paths_info_answers_the_hub_client(mirror: Mirror, root: Path) -> None:
    want = Manifest.load(root / "weightship" / "tiny")
    api = HfApi(endpoint=mirror.url, token=TOKEN)
    got = {e.path: e for e in api.get_paths_info(
        "weightship/tiny", ["config.json", "model.safetensors", "nope.bin"])}
    assert set(got) == {"config.json", "model.safetensors"}  # unknown paths are left out
    weights, config = got["model.safetensors"], got["config.json"]
    assert isinstance(weights, RepoFile) and isinstance(config, RepoFile)
    entry = want.entry("model.safetensors")
    assert entry is not None and weights.size == entry.size
    assert weights.lfs is not None and weights.lfs.sha256 == entry.sha256
    assert config.lfs is None and config.size == (root / "weightship/tiny/config.json").stat().st_size
    nested = api.get_paths_info("weightship/nested", ["sub", "sub/notes.txt"])
    assert [(type(e), e.path) for e in nested] == [(RepoFolder, "sub"), (RepoFile, "sub/notes.txt")]
    # without the token: refused like every other request
    status, headers, _ = mirror.request(
        "POST", "/api/models/weightship/tiny/paths-info/main",
        {"Content-Type": "application/x-www-form-urlencoded"}, b"paths=config.json")
    assert status == 401 and headers["x-error-code"] == "GatedRepo"
    mirror.assert_log_clean()


def test_paths_info_lists_folders_and_refuses_bad_bodies(mirror: Mirror) -> None:
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    url = "/api/models/weightship/tiny/paths-info/main"
    status, _, body = mirror.request("POST", url, form, b"paths=config.json&paths=config.json"
                                                         b"&expand=True")
    assert status == 200 and [e["path"] for e in json.loads(body)] == ["config.json"]
    status, _, body = mirror.request("POST", url, {**AUTH, "Content-Type": "application/json"},
                                     json.dumps({"paths": ["config.json"]}).encode())
    assert status == 200 and [e["type"] for e in json.loads(body)] == ["file"]
    for bad in (b"paths=%FF%FE", b"paths=\xe2\x80\xa6", b"x" * (2 << 20)):
        status, headers, _ = mirror.request("POST", url, form, bad)
        assert status in (400, 413), (bad[:20], status)
        _ascii_header(headers, "x-error-message")
    status, _, _ = mirror.request("POST", url, {**AUTH, "Content-Type": "application/json"},
                                  b'{"paths": "config.json"}')
    assert status == 400
    mirror.assert_log_clean()


def test_healthz_tells_nothing_without_a_token(mirror: Mirror) -> None:
    status, _, body = mirror.request("GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = mirror.request("GET", "/healthz", {"Authorization": "Bearer wrong"})
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = mirror.request("GET", "/healthz", AUTH)
    detail = json.loads(body)
    assert status == 200 and detail["status"] == "ok" and detail["repos"] == 2
    assert isinstance(detail["bytes_sent"], int)
    mirror.assert_log_clean()
