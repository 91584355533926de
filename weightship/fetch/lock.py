"""A lock on a destination directory, so two fetches never write into it at once.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+,
where ``flock`` may silently succeed for everyone) that records who holds it. ``flock`` is taken
on it as well, as a second guard where it works. A lock whose holder is gone (same host, process
no longer alive) is stale and taken over.

A model directory may sit in a cache other pods share (a node's hostPath, a shared claim), so the
state directory is reached by descriptor without following a symlink
(:func:`weightship.paths.open_dir_beneath`), and the lock file is created, read and removed
relative to that descriptor with ``O_NOFOLLOW``: a link swapped in for either is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from weightship.errors import LockedError
from weightship.paths import open_dir_beneath

LOCK_NAME = "lock"


def _holder_alive(info: dict[str, object]) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot tell for another host: assume it is alive
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(state_fd: int) -> dict[str, object]:
    try:
        fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=state_fd)
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(1 << 16))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def dir_lock(state_dir: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock of ``state_dir`` (a model directory's ``.weightship/``) while in the block.

    Waits up to ``wait`` seconds for another holder, then raises :class:`LockedError`.
    """
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    state_fd = open_dir_beneath(state_dir.parent, state_dir.name, create=True)
    try:
        with _locked(state_dir, state_fd, wait):
            yield
    finally:
        os.close(state_fd)


@contextlib.contextmanager
def _locked(state_dir: Path, state_fd: int, wait: float) -> Iterator[None]:
    deadline = time.monotonic() + wait
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    while True:
        try:
            fd = os.open(LOCK_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644, dir_fd=state_fd)
            break
        except FileExistsError:
            info = _read(state_fd)
            if info and not _holder_alive(info):
                # stale: its holder died without cleaning up (unlink never follows a link)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(LOCK_NAME, dir_fd=state_fd)
                continue
            if time.monotonic() >= deadline:
                holder = f"pid {info.get('pid')} on {info.get('host')}" if info else "unknown"
                raise LockedError(state_dir.parent, holder) from None
            time.sleep(0.2)
    try:
        os.write(fd, json.dumps(me).encode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(state_dir.parent, "a process holding flock") from None
        except OSError:
            pass  # no flock on this filesystem: the O_EXCL file is the lock
        yield
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(LOCK_NAME, dir_fd=state_fd)
