"""Independent BitTorrent programs for the interop tests and the bench: opentracker, aria2c.

Each runs as a child process on loopback with DHT, LSD, PEX and port mapping off, and is always
stopped. Debian's opentracker runs in whitelist mode: it answers only for the infohashes in its
``-w`` file.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.net import free_port, listening, wait_until

__all__ = ["aria2", "free_port", "need", "opentracker", "stop"]


def need(tool: str) -> str:
    """The path of ``tool``, or skip: CI installs it (apt-get install aria2 transmission-cli opentracker)."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install aria2 transmission-cli opentracker)")
    return path


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (kill it if it lingers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def opentracker(workdir: Path, infohashes: list[str]) -> Iterator[str]:
    """Run opentracker on a free loopback port, whitelisting ``infohashes``; yields the announce URL."""
    exe = need("opentracker")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "whitelist").write_text("".join(f"{h}\n" for h in infohashes))
    port = free_port()
    proc = subprocess.Popen([exe, "-i", "127.0.0.1", "-p", str(port), "-P", str(port), "-d", str(workdir),
                             "-w", "whitelist"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(port), 10, "opentracker to listen", proc)
        yield f"http://127.0.0.1:{port}/announce"
    finally:
        stop(proc)


ARIA2_QUIET = ["--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
               "--enable-peer-exchange=false", "--console-log-level=warn", "--summary-interval=0",
               "--file-allocation=none", "--bt-require-crypto=false", "--check-certificate=false",
               "--disable-ipv6=true"]


def aria2(torrent: Path, directory: Path, *, seed: bool, port: int,
          extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """aria2c downloading ``torrent`` into ``directory``, or seeding it from there (``seed``)."""
    exe = need("aria2c")
    args = [exe, *ARIA2_QUIET, f"--dir={directory}", f"--listen-port={port}", "--bt-max-peers=50",
            "--bt-stop-timeout=0", *extra]
    if seed:
        args += ["--check-integrity=true", "--seed-ratio=0.0", "--seed-time=600"]
    else:
        args += ["--seed-time=0"]
    return subprocess.Popen([*args, str(torrent)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
