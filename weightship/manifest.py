"""The per-model manifest, ``DIR/.weightship/manifest.json``.

It lists every file of a model directory with its size and sha256, where the bytes came from and
which trust anchor vouched for them, the resolved revision, and when the directory was last
verified. Its JSON schema is ``weightship/schemas/manifest.schema.json``. A manifest is written
atomically (temporary file, fsync, rename, fsync of the directory), and only after every file it
lists has been checked, so a directory with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.resources
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weightship import __version__
from weightship.errors import ManifestError
from weightship.paths import STATE_DIR, dir_beneath, safe_relpath
from weightship.progress import Progress

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"  # beside the manifest: its signature (weightship.signing)

# Anchors that are no trust anchor at all: the manifest a server sent beside the files, unsigned
# (recorded so, and accepted only over TLS; "remote-manifest" is what older versions wrote).
# Nothing whose only anchor is one of these is ever unpickled.
# A non-public Hub endpoint's file listing (HF_ENDPOINT naming a mirror or proxy) is one too.
UNSIGNED_LISTING = "unsigned-hub-listing"
UNSIGNED_ANCHORS = frozenset({"unsigned-remote-manifest", "remote-manifest", UNSIGNED_LISTING})


def manifest_path(directory: Path) -> Path:
    """Where the manifest of ``directory`` lives."""
    return directory / STATE_DIR / MANIFEST_NAME


def utcnow() -> str:
    """The current time as RFC 3339 UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@functools.cache
def schema() -> dict[str, Any]:
    """The manifest's JSON schema."""
    text = (importlib.resources.files("weightship") / "schemas" / "manifest.schema.json").read_text()
    result: dict[str, Any] = json.loads(text)
    return result


@functools.cache
def _validator() -> Any:
    """A validator for :func:`schema`, made once (``jsonschema.validate`` checks the schema itself
    again at every call). jsonschema is imported here, when a manifest is first read: importing
    it takes about 0.1 s, which a command that reads none does not pay."""
    import jsonschema

    return jsonschema.validators.validator_for(schema())(schema())


@dataclass
class FileEntry:
    """One file of a model directory."""

    path: str
    size: int
    sha256: str
    source: str | None = None
    anchor: str | None = None


@dataclass
class SourceInfo:
    """Where a directory as a whole came from."""

    kind: str
    uri: str | None = None
    revision: str | None = None
    infohash: str | None = None


@dataclass
class Manifest:
    """A model directory's manifest; see the module docstring."""

    name: str
    files: list[FileEntry]
    layout: str | None = None
    source: SourceInfo | None = None
    created_at: str = field(default_factory=utcnow)
    verified_at: str | None = None
    weightship_version: str = __version__

    def __post_init__(self) -> None:
        self.files.sort(key=lambda f: f.path)
        seen: set[str] = set()
        for f in self.files:
            safe_relpath(f.path)
            if f.path in seen:
                raise ManifestError(f"manifest lists {f.path!r} twice")
            seen.add(f.path)

    @property
    def total_bytes(self) -> int:
        """Sum of every file's size."""
        return sum(f.size for f in self.files)

    def entry(self, path: str) -> FileEntry | None:
        """The entry for ``path``, if listed."""
        return next((f for f in self.files if f.path == path), None)

    def upsert(self, *entries: FileEntry) -> None:
        """Add ``entries``, each replacing any entry of the same path."""
        new = {e.path: e for e in entries}
        self.files = sorted([f for f in self.files if f.path not in new] + list(new.values()), key=lambda f: f.path)

    # ---- (de)serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (``manifest_version`` first)."""
        body = asdict(self)
        return {"manifest_version": 1, **body}

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "manifest") -> Manifest:
        """Parse and validate a manifest document; ``origin`` names it in errors."""
        from jsonschema.exceptions import best_match

        e = best_match(_validator().iter_errors(data))  # the error jsonschema.validate raises
        if e is not None:
            where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            raise ManifestError(f"{origin}: invalid manifest at {where}: {e.message}") from None
        src = data.get("source")
        return cls(
            name=data["name"],
            files=[FileEntry(**f) for f in data["files"]],
            layout=data.get("layout"),
            source=SourceInfo(**src) if src else None,
            created_at=data.get("created_at") or utcnow(),
            verified_at=data.get("verified_at"),
            weightship_version=data.get("weightship_version", "unknown"),
        )

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest file, or the manifest of a model directory."""
        file = manifest_path(path) if path.is_dir() else path
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            raise ManifestError(
                f"no manifest at {file}", path=file,
                hint="fetch the model with `weightship fetch`, or write one with "
                     "`weightship manifest create DIR`") from None
        if len(raw) > 64 << 20:
            raise ManifestError(f"{file}: manifest over 64 MiB, refusing to parse", path=file)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{file}: not valid JSON ({e})", path=file) from None
        return cls.from_dict(data, origin=str(file))

    def write(self, directory: Path) -> Path:
        """Write atomically to ``directory/.weightship/manifest.json``; returns the path.

        A signature beside the manifest signed the old bytes: when they change it is removed
        (a stale signature would only make every later verification fail).
        """
        target = manifest_path(directory)
        data = (json.dumps(self.to_dict(), indent=2) + "\n").encode()
        directory.mkdir(parents=True, exist_ok=True)
        # By descriptor, refusing a symlink for .weightship/ (a directory in a shared cache).
        with dir_beneath(directory, STATE_DIR, create=True) as state:
            try:
                with os.fdopen(os.open(MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=state), "rb") as f:
                    unchanged = f.read(len(data) + 1) == data
            except OSError:
                unchanged = False
            atomic_write_at(state, MANIFEST_NAME, data)
            if not unchanged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(SIGNATURE_NAME, dir_fd=state)
        return target


def fsync_dir(directory: Path) -> None:
    """Make a rename or creation in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data`` so that readers see the old or the new file, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_at(dir_fd: int, name: str, data: bytes) -> None:
    """:func:`atomic_write` of ``name`` in the directory ``dir_fd``: the temporary file is created
    there with ``O_EXCL | O_NOFOLLOW`` and renamed over ``name`` (a rename never follows it)."""
    for _ in range(100):
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"cannot create a temporary file for {name}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def create_for_directory(directory: Path, *, name: str | None = None,
                         progress: Progress | None = None) -> Manifest:
    """Hash every file of a local directory into a new manifest (not written).

    This is where a company publishing its own weights starts: the manifest becomes the trust
    anchor for everyone who fetches the directory later. Symlinks and names the path sanitizer
    rejects are refused rather than skipped, so the manifest never omits a file silently.
    """
    from weightship.verify.digests import hash_files

    if not directory.is_dir():
        raise ManifestError(f"{directory} is not a directory")
    files: dict[str, Path] = {}
    for root, dirs, names in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d != STATE_DIR]
        for entry in sorted(names) + sorted(dirs):
            path = Path(root) / entry
            rel = (rel_root / entry).as_posix()
            if path.is_symlink():
                raise ManifestError(f"{rel} is a symlink; copy the file in instead",
                                    path=path)
            if path.is_file():
                safe_relpath(rel)
                files[rel] = path
    if not files:
        raise ManifestError(f"{directory} holds no files")
    digests = hash_files(files.items(), progress=progress)
    entries = []
    for rel, result in sorted(digests.items()):
        if isinstance(result, OSError):
            raise result
        size, sha = result
        entries.append(FileEntry(path=rel, size=size, sha256=sha, source=None, anchor="local"))
    layout = "hf" if "config.json" in files else "original" if "params.json" in files else None
    now = utcnow()
    return Manifest(name=name or directory.resolve().name, files=entries, layout=layout,
                    source=SourceInfo(kind="local", uri=str(directory.resolve())),
                    created_at=now, verified_at=now)
