"""The repositories a mirror serves: ``ROOT/org/name`` with a manifest is the repo ``org/name``.

Each directory is described the way the Hub describes a repository at a commit: per file its
size, its git blob id, and for large files (Git LFS on the Hub) the LFS sha256. The sha256 comes
from the directory's manifest (the directory was verified when it was fetched; ``--verify``
re-hashes it at start).

The commit id: a directory fetched from the Hub records the commit it was fetched at
(``source.revision`` of an ``hf`` source, 40 hex digits), and the mirror answers that commit,
so a client pinned to the upstream commit (a catalog card's pin, ``hf://org/name@COMMIT``) is
served by a mirror of it; what it then gets is still checked against its own anchors (the
card's sizes and sha256s, the digests listed here). Any other directory gets an id derived from
the manifest's paths and digests, so it changes exactly when the content does, and a client
pinned to it gets the same bytes. ``main`` names the one commit either way.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from weightship.errors import ManifestError, UnsafePathError
from weightship.manifest import Manifest, manifest_path
from weightship.paths import STATE_DIR, PathsUnder, resolve_under, safe_relpath
from weightship.verify.digests import git_blob_hasher, sha256_and_git_blob

log = logging.getLogger(__name__)

# What the Hub's default .gitattributes stores in Git LFS, plus anything over 10 MiB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".model", ".h5", ".msgpack", ".ckpt",
                ".onnx", ".ot", ".gguf", ".npy", ".npz", ".tar", ".zip", ".gz", ".pkl")
LFS_MIN_SIZE = 10 << 20
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RepoFile:
    """One file as the Hub would describe it."""

    path: str
    size: int
    sha256: str
    blob_id: str  # git blob sha1 of the file (plain git) or of its LFS pointer (LFS)
    lfs: bool
    pointer_size: int | None = None

    @property
    def etag(self) -> str:
        """The Hub's ETag for this file: the LFS sha256, or the git blob id."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class Repo:
    """A model directory served as a repository at one commit."""

    repo_id: str
    directory: Path
    commit: str
    files: dict[str, RepoFile]
    last_modified: str

    def has_revision(self, revision: str) -> bool:
        """Whether ``revision`` names this repo's one commit (``main``, or the commit id)."""
        return revision in ("main", self.commit) or (len(revision) >= 7 and self.commit.startswith(revision))

    def path_of(self, rel: str) -> Path:
        """The on-disk path of a file the repo lists (checked by the path sanitizer)."""
        return resolve_under(self.directory, rel)


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def describe(repo_id: str, directory: Path) -> Repo:
    """Build the Hub's view of ``directory`` from its manifest."""
    m = Manifest.load(directory)
    files: dict[str, RepoFile] = {}
    under = PathsUnder(directory)
    for f in m.files:
        p = under.resolve(f.path)
        if not p.is_file() or p.stat().st_size != f.size:
            raise ManifestError(f"{directory}: {f.path} is missing or has the wrong size; "
                                "re-fetch or re-verify the directory")
        if f.path.endswith(LFS_SUFFIXES) or f.size >= LFS_MIN_SIZE:
            pointer = _lfs_pointer(f.sha256, f.size)
            git = git_blob_hasher(len(pointer))
            git.update(pointer)
            blob = git.hexdigest()
            files[f.path] = RepoFile(f.path, f.size, f.sha256, blob, True, len(pointer))
        else:
            _, sha, blob = sha256_and_git_blob(p)
            if sha != f.sha256:
                raise ManifestError(f"{directory}: {f.path} does not match its manifest")
            files[f.path] = RepoFile(f.path, f.size, f.sha256, blob, False)
    return Repo(repo_id=repo_id, directory=directory, commit=_commit(m, files), files=files,
                last_modified=m.verified_at or m.created_at)


def _commit(m: Manifest, files: dict[str, RepoFile]) -> str:
    """The Hub commit the directory was fetched at, else an id derived from its listing."""
    if m.source is not None and m.source.kind == "hf" and _COMMIT.fullmatch(m.source.revision or ""):
        return str(m.source.revision)
    listing = "".join(f"{f.path}\0{f.sha256}\0{f.size}\n" for f in sorted(files.values(), key=lambda f: f.path))
    return hashlib.sha1(b"weightship-mirror\n" + listing.encode(), usedforsecurity=False).hexdigest()


class MirrorRoot:
    """The repos under a root directory, described lazily and cached until a manifest changes."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._cache: dict[str, tuple[int, Repo]] = {}
        self._lock = threading.Lock()

    def directory_for(self, repo_id: str) -> Path | None:
        """The directory of ``repo_id`` (``org/name`` or ``name``), if it holds a manifest."""
        try:
            rel = safe_relpath(repo_id)
        except UnsafePathError:
            return None
        if len(rel.parts) > 2 or STATE_DIR in rel.parts:
            return None
        try:
            d = resolve_under(self.root, repo_id)
        except UnsafePathError:
            return None
        return d if manifest_path(d).is_file() else None

    def repo(self, repo_id: str) -> Repo | None:
        """The repo ``repo_id``, or None when there is none."""
        d = self.directory_for(repo_id)
        if d is None:
            return None
        stamp = manifest_path(d).stat().st_mtime_ns
        with self._lock:
            cached = self._cache.get(repo_id)
            if cached and cached[0] == stamp:
                return cached[1]
        repo = describe(repo_id, d)
        with self._lock:
            self._cache[repo_id] = (stamp, repo)
        return repo

    def repo_ids(self) -> list[str]:
        """Every repo under the root (one or two levels deep)."""
        found = []
        for m in sorted(self.root.glob(f"*/{STATE_DIR}/manifest.json")) + sorted(
                self.root.glob(f"*/*/{STATE_DIR}/manifest.json")):
            rel = m.parent.parent.relative_to(self.root).as_posix()
            if self.directory_for(rel) is not None:
                found.append(rel)
        return found
