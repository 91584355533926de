"""Interoperability with independent clients, both ways, found through a real tracker.

weightship seeds and aria2c downloads; aria2c seeds and weightship downloads. (transmission-cli
3.00 is not used here: it treats 127.0.0.0/8 peer addresses as martian and never dials them, so
it cannot join a loopback-only swarm.)
The torrents are made by ``weightship torrent create --v1-only`` (Debian's aria2 1.36 and
transmission 3.00 do not read v2) and announced to Debian's opentracker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.torrent.tools import aria2, free_port, opentracker, stop
from weightship.manifest import Manifest
from weightship.torrent.create import create_torrent
from weightship.verify.digests import sha256_file


def _create(model: Path, out: Path, tracker: str) -> dict[str, object]:
    r = run_cli("torrent", "create", model, "--v1-only", "--tracker", tracker, "--out", out, "--json")
    assert r.code == 0, r
    result: dict[str, object] = json.loads(r.stdout)
    return result


@contextmanager
def _weightship_seed(model: Path, torrent: Path) -> Iterator[dict[str, object]]:
    proc = subprocess.Popen([sys.executable, "-m", "weightship", "seed", str(model), "--torrent", str(torrent),
                             "--listen", "127.0.0.1:0", "--for", "300", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "weightship seed did not start"
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(30)


def _complete_copy(model: Path, root: Path) -> bool:
    m = Manifest.load(model)
    for f in m.files:
        p = root / f.path
        if not p.is_file() or p.stat().st_size != f.size or sha256_file(p)[1] != f.sha256:
            return False
    return True


@pytest.fixture
def swarm_setup(tiny_hf_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A --v1-only torrent of the tiny model, announced to a running opentracker."""
    # trackers live outside the info dict: the infohash is known before the tracker's port
    infohash = create_torrent(tiny_hf_dir, v1_only=True).meta.infohash
    with opentracker(tmp_path / "tracker", [infohash]) as url:
        torrent = tmp_path / "tiny.torrent"
        made = _create(tiny_hf_dir, torrent, url)
        assert made["infohash"] == infohash
        yield torrent, url


def test_aria2c_downloads_from_weightship_seed(tiny_hf_dir: Path, swarm_setup: tuple[Path, str],
                                               tmp_path: Path) -> None:
    torrent, _ = swarm_setup
    with _weightship_seed(tiny_hf_dir, torrent):
        out = tmp_path / "aria2"
        client = aria2(torrent, out, seed=False, port=free_port())
        try:
            client.wait(120)
            assert client.returncode == 0, client.stderr.read() if client.stderr else ""
        finally:
            stop(client)
    assert _complete_copy(tiny_hf_dir, out / "weightship-tiny")


def test_weightship_downloads_from_aria2c_seed(tiny_hf_dir: Path, swarm_setup: tuple[Path, str],
                                               tmp_path: Path) -> None:
    torrent, _ = swarm_setup
    parent = tmp_path / "aria2-seed"
    parent.mkdir()
    (parent / "weightship-tiny").symlink_to(tiny_hf_dir)
    client = aria2(torrent, parent, seed=True, port=free_port())
    try:
        dest = tmp_path / "got"
        # no --peer: the only way to the seeder is the tracker named in the torrent
        r = run_cli("fetch", torrent, "--to", dest, "--json", timeout=180)
        assert r.code == 0, r
        assert run_cli("verify", dest).code == 0
        assert _complete_copy(tiny_hf_dir, dest)
    finally:
        stop(client)
