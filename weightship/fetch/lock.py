"""A lock on a destination directory, so two fetches never write into it at once.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+,
where ``flock`` may silently succeed for everyone) that records who holds it. ``flock`` is taken
on it as well, as a second guard where it works. A lock whose holder is gone (same host, process
no longer alive) is stale and taken over.
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


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def dir_lock(state_dir: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock of ``state_dir`` (a model directory's ``.weightship/``) while in the block.

    Waits up to ``wait`` seconds for another holder, then raises :class:`LockedError`.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    deadline = time.monotonic() + wait
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            info = _read(path)
            if info and not _holder_alive(info):
                path.unlink(missing_ok=True)  # stale: its holder died without cleaning up
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
        path.unlink(missing_ok=True)
