"""The one sanitizer for paths that come from outside weightship.

A torrent's file list, a Hub repo listing, an S3 key, a manifest: each names files that will be
written or read under a destination directory. Every such name passes :func:`safe_relpath`
(its text) and :func:`resolve_under` (where it lands on disk) before anything touches the disk.
A bad name is rejected with :class:`~weightship.errors.UnsafePathError`, never repaired:
renaming a file silently would change what the model directory contains.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

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
    rel = safe_relpath(name)
    root = dest.resolve()
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise UnsafePathError(name, f"{current} is a symlink")
    resolved = Path(os.path.normpath(current))
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(name, f"resolves outside {root}")
    return resolved
