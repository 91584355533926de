"""A stand-in for the Hugging Face Hub as a download meets it, for the fetch tests.

``weightship mirror`` (the real thing the tests use for the Hub protocol) serves verified
directories faithfully. This stand-in does what the public Hub does and the mirror does not:

- it answers for whatever commit id a repo is given (``HubRepo.commit``), so a catalog card's
  pinned commit can be served;
- a large (LFS) file's ``resolve`` URL answers ``302`` to a CDN on another host (a
  :class:`~tests.fetch.webserver.FileServer` holding each blob under its sha256), with the
  Hub's ``X-Repo-Commit``, ``X-Linked-Etag`` and ``X-Linked-Size`` headers;
- it misbehaves the way the Hub does: a gated repo (file list public, downloads ``403`` with
  ``X-Error-Code: GatedRepo``), a ``503`` on the first request for a file, a ``403`` on a
  ``HEAD``, metadata that lists another size or sha256 than the bytes it serves.

Only what ``huggingface_hub.HfApi.model_info(..., files_metadata=True)`` and weightship's
downloader read is implemented.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.fetch.webserver import FileServer, serve

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pth")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    """One repository at one commit."""

    commit: str
    files: dict[str, bytes]
    gated: bool = False
    listed_sha256: dict[str, str] = field(default_factory=dict)  # lie about these digests
    listed_size: dict[str, int] = field(default_factory=dict)  # lie about these sizes
    aliases: set[str] = field(default_factory=set)  # other revisions it answers with this commit

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


class HubStub(ThreadingHTTPServer):
    """The stand-in; see the module docstring."""

    daemon_threads = True

    def __init__(self, cdn: FileServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.cdn = cdn
        self.repos: dict[str, HubRepo] = {}
        self.first_503: dict[str, int] = {}  # path -> first requests (HEAD or GET) to answer 503
        self.head_403: set[str] = set()  # paths whose HEAD is refused
        self.revisions_asked: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.agents: list[str | None] = []  # each request's User-Agent header
        self.corrupt: set[str] = set()  # paths served with their last byte flipped
        self.gone: set[str] = set()  # paths listed but answered 404
        self.delay = 0.0  # seconds before each resolve answer (a far Hub)
        self.say_commit: str | None = None  # X-Repo-Commit to send instead of the repo's
        self.listing: bytes | None = None  # the body of every listing, instead of the repo's
        self.in_flight = self.most_in_flight = 0  # resolve requests being answered at once
        self.gather = 0  # hold each resolve answer until this many are in flight (at most 5 s)
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, repo_id: str, repo: HubRepo) -> None:
        """Serve ``repo`` as ``repo_id``; its LFS blobs go to the CDN."""
        self.repos[repo_id] = repo
        for path, data in repo.files.items():
            if repo.is_lfs(path):
                (self.cdn.root / hashlib.sha256(data).hexdigest()).write_bytes(data)


class _Handler(BaseHTTPRequestHandler):
    server: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, json.dumps(body).encode(), headers)

    def _send_json(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.server.lock:
            self.server.requests.append((self.command, path))
            self.server.authorizations.append(self.headers.get("Authorization"))
            self.server.agents.append(self.headers.get("User-Agent"))
        if m := _INFO.match(path):
            self._info(m.group("repo"), m.group("rev") or "main")
        elif m := _RESOLVE.match(path):
            srv = self.server
            with srv.arrived:
                srv.in_flight += 1
                srv.most_in_flight = max(srv.most_in_flight, srv.in_flight)
                srv.arrived.notify_all()
                srv.arrived.wait_for(lambda: srv.in_flight >= srv.gather, timeout=5)
            try:
                self._resolve(m.group("repo"), m.group("rev"), m.group("path"))
            finally:
                with self.server.lock:
                    self.server.in_flight -= 1
        else:
            self._error(404, "EntryNotFound", f"no route {path}")

    do_HEAD = do_GET

    def _repo(self, repo_id: str, rev: str) -> HubRepo | None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if rev not in ("main", repo.commit, *repo.aliases):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo

    def _info(self, repo_id: str, rev: str) -> None:
        with self.server.lock:
            self.server.revisions_asked.append(rev)
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        if self.server.listing is not None:
            self._send_json(200, self.server.listing)
            return
        siblings = []
        for p, data in sorted(repo.files.items()):
            size = repo.listed_size.get(p, len(data))
            entry: dict[str, object] = {"rfilename": p, "size": size, "blobId": _blob_id(data)}
            if repo.is_lfs(p):
                sha = repo.listed_sha256.get(p, hashlib.sha256(data).hexdigest())
                entry["lfs"] = {"sha256": sha, "size": size, "pointerSize": 134}
            siblings.append(entry)
        self._json(200, {"_id": repo.commit, "id": repo_id, "modelId": repo_id, "sha": repo.commit,
                         "private": False, "gated": "manual" if repo.gated else False,
                         "disabled": False, "tags": [], "siblings": siblings})

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        srv = self.server
        if repo.gated:
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not "
                                          "in the authorized list. Visit its page to ask for access.")
            return
        with srv.lock:
            left = srv.first_503.get(path, 0)
            if left:
                srv.first_503[path] = left - 1
        if left:
            self._error(503, "ServiceUnavailable", "try again")
            return
        if self.command == "HEAD" and path in srv.head_403:
            self._error(403, "Forbidden", "not today")
            return
        if srv.delay:
            time.sleep(srv.delay)
        data = None if path in srv.gone else repo.files.get(path)
        if data is not None and path in srv.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        if data is None:
            self._error(404, "EntryNotFound", f"{path} does not exist at {repo.commit}")
            return
        headers = {"X-Repo-Commit": srv.say_commit or repo.commit, "Accept-Ranges": "bytes"}
        if repo.is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"{srv.cdn.url}{sha}?X-Amz-Signature=cdn-secret")
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end, status = 0, len(data), 200
        if m := _RANGE.match(self.headers.get("Range", "")):
            start, end, status = int(m.group(1)), min(len(data), int(m.group(2) or len(data) - 1) + 1), 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self.send_response(status)
        self.send_header("ETag", f'"{_blob_id(data)}"')
        self.send_header("Content-Length", str(end - start))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[start:end])


@contextmanager
def hub(tmp: Path) -> Iterator[HubStub]:
    """A :class:`HubStub` and its CDN (blobs under ``tmp``) on loopback, stopped afterwards."""
    tmp.mkdir(parents=True, exist_ok=True)
    with serve(tmp) as cdn:
        stub = HubStub(cdn)
        thread = threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield stub
        finally:
            stub.shutdown()
            stub.server_close()
            thread.join(5)
