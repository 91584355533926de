"""The one sanitizer for paths that come from outside weightship.

A torrent's file list, a Hub repo listing, an S3 key, a manifest: each names files that will be
written or read under a destination directory. Every such name passes :func:`safe_relpath`
(its text) and :func:`resolve_under` (where it lands on disk) before anything touches the disk.
A bad name is rejected with :class:`~weightship.errors.UnsafePathError`, never repaired:
renaming a file silently would change what the model directory contains.

A check of the disk and a later use of the same path race: in a shared cache (a node's hostPath,
a shared claim) another pod with the same uid can swap a component for a symlink in between.
So the writes and renames under a destination do not trust an earlier check: they walk the path
one component at a time from a descriptor of the destination, each opened with ``O_NOFOLLOW``
(openat-style, ``os.open(..., dir_fd=...)``), and a symlink met on the way is refused at that
moment (:func:`open_dir_beneath`, :func:`open_beneath`, :func:`replace_beneath`). The destination
itself is the user's choice and may be a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePath, PurePosixPath

from weightship.errors import UnsafePathError

STATE_DIR = ".weightship"  # weightship's own state inside a model directory; never a model file

_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux and most filesystems
_MAX_PATH_BYTES = 4096


def safe_relpath(name: str) -> PurePosixPath:
    """Check that ``name`` is a plain relative POSIX path and return it.

    Rejected: empty names, NUL and other control characters, backslashes, absolute paths, drive
    letters, UNC prefixes, ``.``/``..``/empty components, over-long names, and anything inside
    weightship's own state directory.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(str(name), "empty path")
    if "\x00" in name:
        raise UnsafePathError(name, "contains NUL")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafePathError(name, "contains a control character")
    if "\\" in name:
        raise UnsafePathError(name, "contains a backslash")
    if name.startswith("//"):
        raise UnsafePathError(name, "UNC path")
    if name.startswith("/"):
        raise UnsafePathError(name, "absolute path")
    if _DRIVE.match(name):
        raise UnsafePathError(name, "drive letter")
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_PATH_BYTES:
        raise UnsafePathError(name, "path too long")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(name, f"component {part!r} is not allowed")
        if len(part.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT_BYTES:
            raise UnsafePathError(name, "component too long")
    if parts[0] == STATE_DIR:
        raise UnsafePathError(name, f"{STATE_DIR}/ is weightship's own state")
    return PurePosixPath(name)


def resolve_under(dest: Path, name: str) -> Path:
    """The on-disk path of ``name`` under ``dest``, after checking it cannot land elsewhere.

    Besides :func:`safe_relpath`, every component that already exists must be a real directory
    or file, not a symlink (a planted link could redirect a write), and the resolved result must
    stay under the resolved ``dest``.
    """
    return PathsUnder(dest).resolve(name)


class PathsUnder:
    """:func:`resolve_under` for many names under one ``dest``: ``dest`` resolved once, and each
    directory on the way looked at once (a thousand files in a few folders cost a few thousand
    ``lstat`` calls fewer, and as many path objects)."""

    def __init__(self, dest: Path) -> None:
        self.root = dest.resolve()
        self._dirs: set[Path] = set()  # directories below root found not to be symlinks

    def resolve(self, name: str) -> Path:
        """:func:`resolve_under` of ``name``."""
        rel = safe_relpath(name)
        current = self.root
        last = len(rel.parts) - 1
        for i, part in enumerate(rel.parts):
            current = current / part
            if current in self._dirs:
                continue
            if current.is_symlink():
                raise UnsafePathError(name, f"{current} is a symlink")
            if i < last:
                self._dirs.add(current)
        resolved = Path(os.path.normpath(current))
        if resolved != self.root and self.root not in resolved.parents:
            raise UnsafePathError(name, f"resolves outside {self.root}")
        return resolved


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(rel: str, part: str, e: OSError) -> UnsafePathError:
    return UnsafePathError(rel, f"{part} is a symlink or not a directory ({e.strerror})")


def open_dir_beneath(root: Path | int, rel: str | PurePath, *, create: bool = False) -> int:
    """A descriptor of the directory ``root/rel`` reached without following a symlink below
    ``root`` (``root`` a path or a directory descriptor); with ``create``, missing directories
    are made on the way. The caller closes it."""
    rel_path = PurePosixPath(rel)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if not isinstance(root, int) else os.dup(root)
    try:
        for part in rel_path.parts:
            if part in ("", ".", "..", "/"):
                raise UnsafePathError(str(rel), f"component {part!r} is not allowed")
            try:
                nxt = _open_dir_at(fd, part, create)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(str(rel), part, e) from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_dir_at(fd: int, name: str, create: bool) -> int:
    """The directory ``name`` in ``fd``, made first when missing and ``create`` (opened before
    any mkdir: a directory that is there, the usual case, costs no failing mkdir)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # made by another thread meanwhile
        os.mkdir(name, 0o755, dir_fd=fd)
    return os.open(name, _DIR_FLAGS, dir_fd=fd)


@contextlib.contextmanager
def dir_beneath(root: Path | int, rel: str | PurePath, *, create: bool = False) -> Iterator[int]:
    """:func:`open_dir_beneath` as a context manager that closes the descriptor."""
    fd = open_dir_beneath(root, rel, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_beneath(root: Path | int, rel: str | PurePath, flags: int, mode: int = 0o644, *,
                 create_parents: bool = False) -> int:
    """``os.open`` of ``root/rel`` with ``O_NOFOLLOW`` on every component below ``root``: a
    symlink anywhere on the way is refused (:class:`UnsafePathError`) when the file is opened,
    not at some earlier check."""
    rel_path = PurePosixPath(rel)
    with dir_beneath(root, rel_path.parent, create=create_parents) as parent:
        try:
            return os.open(rel_path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePathError(str(rel), f"{rel_path.name} is a symlink") from None
            raise


def unlink_beneath(root: Path, path: Path) -> None:
    """Remove ``path``, a file below ``root``, if it is there, reaching it without following a
    symlink below ``root``: a directory swapped for a link meanwhile cannot make a clean-up
    delete a file elsewhere (:class:`UnsafePathError`). A missing file or directory is fine."""
    rel = PurePosixPath(path.relative_to(root))
    try:
        with dir_beneath(root, rel.parent) as parent:
            os.unlink(rel.name, dir_fd=parent)
    except FileNotFoundError:
        pass


def replace_beneath(root: Path | int, src: str | PurePath, dst: str | PurePath, *,
                    same_as: int | None = None, durable: bool = True) -> None:
    """Rename ``root/src`` to ``root/dst`` (atomic, replacing), without following a symlink below
    ``root``; ``dst``'s missing parents are made, and the rename is made durable.

    A rename never follows its own last components, but it would move a symlink planted in
    ``src``'s place: ``src`` must be a regular file, and what arrives at ``dst`` must be that
    same file (if another was swapped in meanwhile, it is removed again and refused). With
    ``same_as`` (a descriptor), ``src`` must also be the file behind it: the one that was checked.
    ``durable=False`` leaves the directory's fsync to the caller (one per directory for a batch).
    """
    src_path, dst_path = PurePosixPath(src), PurePosixPath(dst)
    with dir_beneath(root, src_path.parent) as sdir, dir_beneath(root, dst_path.parent, create=True) as ddir:
        _replace_at(sdir, src_path.name, ddir, dst_path.name, str(src), same_as)
        if durable:
            os.fsync(ddir)


def replace_all_beneath(root: Path | int, moves: Iterable[tuple[str | PurePath, str | PurePath]]) -> None:
    """:func:`replace_beneath` of every ``(src, dst)`` of ``moves``, with ``durable=False``, each
    pair of directories reached once (a fetch of a thousand small files in a few directories
    walks down to them a few times, not two thousand)."""
    by_dirs: dict[tuple[PurePosixPath, PurePosixPath], list[tuple[PurePosixPath, PurePosixPath]]] = {}
    for src, dst in moves:
        s, d = PurePosixPath(src), PurePosixPath(dst)
        by_dirs.setdefault((s.parent, d.parent), []).append((s, d))
    for (src_dir, dst_dir), files in by_dirs.items():
        with dir_beneath(root, src_dir) as sdir, dir_beneath(root, dst_dir, create=True) as ddir:
            for s, d in files:
                _replace_at(sdir, s.name, ddir, d.name, str(s), None)


def _replace_at(sdir: int, src: str, ddir: int, dst: str, where: str, same_as: int | None) -> None:
    """The rename of :func:`replace_beneath`, with its checks, between two open directories."""
    before = os.stat(src, dir_fd=sdir, follow_symlinks=False)
    if not stat.S_ISREG(before.st_mode):
        raise UnsafePathError(where, "is not a regular file")
    if same_as is not None:
        checked = os.fstat(same_as)
        if (checked.st_dev, checked.st_ino) != (before.st_dev, before.st_ino):
            raise UnsafePathError(where, "is not the file that was checked")
    os.replace(src, dst, src_dir_fd=sdir, dst_dir_fd=ddir)
    after = os.stat(dst, dir_fd=ddir, follow_symlinks=False)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(after.st_mode):
        os.unlink(dst, dir_fd=ddir)
        raise UnsafePathError(where, "was replaced while it was being moved into place")
