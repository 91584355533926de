"""``weightship serve`` as a real process on loopback, for the tests that stop, kill and restart
it (keys, usage)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.net import wait_until


def start(model_dir: Path, port: int, *args: str | Path) -> subprocess.Popen[str]:
    """Start ``weightship serve`` on ``port`` and wait until it is ready."""
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHIP_DEBUG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightship", "serve", str(model_dir), "--port", str(port),
         "--device", "cpu", "--max-model-len", "1024", "--max-batch", "8", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 120, "serve to turn ready", proc)  # type: ignore[arg-type]
    except AssertionError:
        proc.kill()
        raise AssertionError(f"serve did not start: {proc.communicate(timeout=30)[0]}") from None
    return proc


@contextmanager
def serving(model_dir: Path, port: int, *args: str | Path) -> Iterator[subprocess.Popen[str]]:
    """:func:`start`, killed on exit if still running."""
    proc = start(model_dir, port, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
