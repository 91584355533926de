"""The mirror's HTTP API: the subset of the Hugging Face Hub that downloads use.

- ``GET /api/models/{repo}[/revision/{rev}]``: repo info with ``sha`` and ``siblings`` (with
  ``?blobs=true``: ``size``, ``blobId`` and ``lfs.sha256``), as ``HfApi.model_info`` reads it;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` and ``POST …/paths-info/{rev}``: the tree
  entries ``list_repo_tree`` / ``get_paths_info`` read (``oid``, ``size``, ``lfs.oid``);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file, with ``Range`` (206/416) and the
  headers ``hf_hub_download`` relies on: ``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag`` (the
  LFS sha256, or the git blob id), ``X-Linked-Size``, ``Content-Length``, ``Accept-Ranges``.

Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``), so clients raise their usual exceptions. With a token file,
every request needs ``Authorization: Bearer TOKEN`` with one of its tokens; ``GET /healthz``
answers anyone, but says how many repos it serves and how many bytes it sent only to a caller
with a token.

Whatever a client sends, a bad request is a 4xx: names from the URL reach the response headers
escaped to printable ASCII, tokens are compared as bytes, ``Range`` numbers of any length are
read without ``int()`` on thousands of digits, and request bodies are capped.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from weightship.mirror.repos import MirrorRoot, Repo, RepoFile

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_SEND = 1 << 20
_BEYOND = 1 << 62  # a Range position past the end of any file
_MAX_BODY = 1 << 20  # a paths-info body: ample for thousands of paths
_MAX_PATHS = 10_000


def _header_safe(text: str) -> str:
    """``text`` as a header value: printable ASCII kept, anything else backslash-escaped (a
    header carries only latin-1, and never a CR, LF or NUL)."""
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status,
                        headers={"X-Error-Code": code, "X-Error-Message": _header_safe(message)})


def _position(digits: str) -> int:
    """A Range position; one too long for ``int()`` (which refuses over 4,300 digits) is past
    the end of any file, which is what it means."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else _BEYOND


async def _body(request: Request) -> bytes | Response:
    """The request body, or a 413 past :data:`_MAX_BODY` bytes."""
    too_large = _error(413, "BadRequest", f"the body is over {_MAX_BODY} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and len(declared) < 19 and int(declared) > _MAX_BODY:
        return too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_BODY:
            return too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _paths_from(body: bytes, content_type: str) -> list[str] | Response:
    """The ``paths`` a paths-info request asks for, or a 400: huggingface_hub sends them as an
    ``application/x-www-form-urlencoded`` form (``paths=a&paths=b&expand=True``); a JSON
    ``{"paths": [...]}`` is read too. Parsed with the standard library (no python-multipart)."""
    paths: object
    if content_type.split(";", 1)[0].strip().lower() == "application/json":
        try:
            paths = json.loads(body).get("paths", [])
        except (ValueError, AttributeError):
            return _error(400, "BadRequest", "the body is not a JSON object")
    else:
        try:
            form = parse_qs(body.decode("ascii"), keep_blank_values=True, encoding="utf-8",
                            errors="strict", max_num_fields=_MAX_PATHS + 10)
        except UnicodeDecodeError:
            return _error(400, "BadRequest", "the form is not URL-encoded UTF-8")
        except ValueError:  # more fields than max_num_fields
            return _error(400, "BadRequest", f"more than {_MAX_PATHS} paths")
        paths = form.get("paths", [])
    if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
        return _error(400, "BadRequest", '"paths" must be a list of strings')
    if len(paths) > _MAX_PATHS:
        return _error(400, "BadRequest", f"more than {_MAX_PATHS} paths")
    return list(dict.fromkeys(paths))


class _Api:
    def __init__(self, root: MirrorRoot, tokens: frozenset[str]) -> None:
        self.root, self.tokens = root, tokens
        # Compared as bytes: compare_digest refuses non-ASCII str, and a header is latin-1.
        self._token_bytes = [t.encode() for t in tokens]
        self.bytes_sent = 0  # file bytes served (for /healthz and the tests' resume bounds)

    # ---- helpers ------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if not self.tokens:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        raw = given.encode("latin-1")  # the bytes the client sent (starlette decodes latin-1)
        return any(hmac.compare_digest(raw, t) for t in self._token_bytes)

    def _repo(self, request: Request, repo_id: str, revision: str | None) -> Repo | Response:
        if not self._authorized(request):
            return _error(401, "GatedRepo", f"Access to {repo_id} on this mirror needs a token "
                                            "(set HF_TOKEN).")
        repo = self.root.repo(repo_id)
        if repo is None:
            return _error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        if revision is not None and not repo.has_revision(revision):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo

    @staticmethod
    def _sibling(f: RepoFile, blobs: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": f.path}
        if blobs:
            entry |= {"size": f.size, "blobId": f.blob_id}
            if f.lfs:
                entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        return entry

    @staticmethod
    def _tree_entry(f: RepoFile) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        return entry

    # ---- endpoints ----------------------------------------------------------------------------

    async def info(self, request: Request) -> Response:
        repo_id, revision = request.path_params["repo_id"], request.path_params.get("revision")
        repo = self._repo(request, repo_id, revision or "main")
        if isinstance(repo, Response):
            return repo
        blobs = request.query_params.get("blobs", "").lower() == "true"
        return JSONResponse({
            "_id": repo.commit, "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
            "lastModified": repo.last_modified, "createdAt": repo.last_modified,
            "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": ["weightship-mirror"], "library_name": "transformers",
            "siblings": [self._sibling(f, blobs) for f in sorted(repo.files.values(), key=lambda f: f.path)],
        })

    async def tree(self, request: Request) -> Response:
        p = request.path_params
        repo = self._repo(request, p["repo_id"], p["revision"])
        if isinstance(repo, Response):
            return repo
        prefix = p.get("path", "").strip("/")
        recursive = request.query_params.get("recursive", "").lower() == "true"
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict[str, Any]] = {}
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            if not f.path.startswith(base):
                continue
            rest = f.path[len(base):]
            if "/" in rest and not recursive:
                folder = base + rest.split("/", 1)[0]
                entries.setdefault(folder, {"type": "directory", "oid": repo.commit, "path": folder})
            else:
                if recursive:
                    parts = rest.split("/")[:-1]
                    for i in range(1, len(parts) + 1):
                        folder = base + "/".join(parts[:i])
                        entries.setdefault(folder, {"type": "directory", "oid": repo.commit, "path": folder})
                entries[f.path] = self._tree_entry(f)
        if prefix and not entries:
            return _error(404, "EntryNotFound", f"{prefix} does not exist at {repo.commit}")
        return JSONResponse(list(entries.values()))

    async def paths_info(self, request: Request) -> Response:
        p = request.path_params
        repo = self._repo(request, p["repo_id"], p["revision"])
        if isinstance(repo, Response):
            return repo
        body = await _body(request)
        if isinstance(body, Response):
            return body
        paths = _paths_from(body, request.headers.get("content-type", ""))
        if isinstance(paths, Response):
            return paths
        folders = {f.path.rsplit("/", i)[0] for f in repo.files.values()
                   for i in range(1, f.path.count("/") + 1)}
        entries: list[dict[str, Any]] = []
        for x in paths:
            if x in repo.files:
                entries.append(self._tree_entry(repo.files[x]))
            elif x.strip("/") in folders:
                entries.append({"type": "directory", "oid": repo.commit, "path": x.strip("/")})
        return JSONResponse(entries)

    async def resolve(self, request: Request) -> Response:
        p = request.path_params
        repo_id = f"{p['org']}/{p['name']}" if "org" in p else p["name"]
        repo = self._repo(request, repo_id, p["revision"])
        if isinstance(repo, Response):
            return repo
        f = repo.files.get(p["path"])
        if f is None:
            return _error(404, "EntryNotFound", f"{p['path']} does not exist at {repo.commit}")
        headers = {
            "X-Repo-Commit": repo.commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(f.path.rsplit('/', 1)[-1])}",
        }
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        start, end, status = 0, f.size, 200
        rng = _RANGE.match(request.headers.get("range", "").strip())
        if rng and (rng.group(1) or rng.group(2)):
            first, last = rng.group(1), rng.group(2)
            if first:
                start = _position(first)
                end = min(_position(last) + 1, f.size) if last else f.size
            else:  # a suffix: the last N bytes
                start, end = max(0, f.size - _position(last)), f.size
            if start >= f.size or start >= end:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{f.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        path = repo.path_of(f.path)
        return StreamingResponse(iterate_in_threadpool(self._count(_read(path, start, end))),
                                 status_code=status, headers=headers)

    def _count(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for data in chunks:
            self.bytes_sent += len(data)  # one thread per chunk at a time; += on an int is fine
            yield data

    async def health(self, request: Request) -> Response:
        """Liveness for anyone; the counts only for a caller with a token (a mirror without a
        token file tells them to no one: they would map what it holds)."""
        if not self.tokens or not self._authorized(request):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "repos": len(self.root.repo_ids()),
                             "bytes_sent": self.bytes_sent})


def _read(path: Path, start: int, end: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            data = os.pread(fd, min(_SEND, end - pos), pos)
            if not data:
                return  # the file shrank under us: the client sees a short body and retries
            pos += len(data)
            yield data
    finally:
        os.close(fd)


def create_app(root: Path, *, tokens: frozenset[str] = frozenset()) -> Starlette:
    """The mirror's ASGI app for the model directories under ``root``."""
    api = _Api(MirrorRoot(root), tokens)
    app = Starlette(routes=[
        Route("/healthz", api.health),
        Route("/api/models/{repo_id:path}/revision/{revision}", api.info),
        Route("/api/models/{repo_id:path}/tree/{revision}/{path:path}", api.tree),
        Route("/api/models/{repo_id:path}/tree/{revision}", api.tree),
        Route("/api/models/{repo_id:path}/paths-info/{revision}", api.paths_info, methods=["POST"]),
        Route("/api/models/{repo_id:path}", api.info),
        Route("/{org}/{name}/resolve/{revision}/{path:path}", api.resolve, methods=["GET", "HEAD"]),
        Route("/{name}/resolve/{revision}/{path:path}", api.resolve, methods=["GET", "HEAD"]),
    ])
    app.state.api = api
    return app
