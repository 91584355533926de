"""SIGKILL a running ``weightship fetch`` at random points of its download."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Bytes a resumed fetch may download again per kill: the chunks in flight or waiting for the
# writer when it died, one per buffer: parallel files (2) x (connections (3) + 2) x chunk (2 MiB),
# as the fetches below are started.
RESUME_BOUND = 2 * (3 + 2) * (2 << 20)


def _fetch_proc(url: str, dest: Path, env: dict[str, str] | None,
                extra: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "weightship", "fetch", url, "--to", str(dest),
                             "--chunk-mib", "2", "--connections", "3", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})


def kill_at_random_points(url: str, dest: Path, total: int, kills: int, seed: int,
                          env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> int:
    """Start a fetch (with ``extra`` arguments) and SIGKILL it once its partial files reach a
    random fraction of ``total``, ``kills`` times; returns how many kills landed mid-download."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(kills):
        target = rng.uniform(0.02, 0.95) * total
        proc = _fetch_proc(url, dest, env, extra)
        while proc.poll() is None:
            if _partial_bytes(dest / ".weightship" / "incoming") >= target:
                os.kill(proc.pid, signal.SIGKILL)
                landed += 1
                break
            time.sleep(0.002)
        proc.wait()
    return landed


def _partial_bytes(incoming: Path) -> int:
    """Bytes in the partial files under ``incoming`` (one may be promoted while we look)."""
    total = 0
    for p in incoming.rglob("*.incomplete") if incoming.exists() else ():
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total
