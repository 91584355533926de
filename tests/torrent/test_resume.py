"""Resume after kill -9 (fast-resume data), and peers found through DNS."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.net import wait_until
from tests.torrent.conftest import Seeder
from weightship.fetch import FetchOptions, PeerOptions, build_request, fetch
from weightship.manifest import Manifest
from weightship.progress import Progress
from weightship.torrent.metadata import load_torrent_bytes
from weightship.torrent.peers import PeerSource, parse_duration, parse_endpoint

RATE = 4 << 20  # the seeder's upload limit: a kill lands mid-download
RESUME_EVERY = 0.5

_CHILD = """
import sys
from pathlib import Path
from weightship.fetch import FetchOptions, PeerOptions, TorrentOptions, build_request, fetch
options = FetchOptions(peers=PeerOptions(listen="127.0.0.1:0", peers=(sys.argv[2],)),
                       torrent=TorrentOptions(resume_every=float(sys.argv[4])))
fetch(build_request(sys.argv[1], options=options), Path(sys.argv[3]))
"""


class Notes(Progress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, message: str) -> None:
        self.lines.append(message)


def test_kill_9_then_resume(tiny_hf_dir: Path, tiny_torrent: Path, seeder: Seeder, tmp_path: Path) -> None:
    """Kill the fetch at random points; the restart completes and re-fetches only ~RESUME_EVERY s."""
    meta = load_torrent_bytes(tiny_torrent.read_bytes(), "tiny")
    total = meta.info.total_size()  # what the seeder serves, BEP 47 padding included
    piece = meta.info.piece_length()
    expected = {f.path: f.sha256 for f in Manifest.load(tiny_hf_dir).files}
    runs = int(os.environ.get("WEIGHTSHIP_TORRENT_KILL_RUNS", "3"))
    rng = random.Random(20231027)
    resumed_runs = 0
    for run in range(runs):
        s = seeder(tiny_hf_dir, torrent=tiny_torrent.read_bytes(), upload_limit=RATE)
        assert s.uploaded is not None
        dest = tmp_path / f"run{run}"
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tiny_torrent), s.listen[0], str(dest),
                                  str(RESUME_EVERY)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # killed part-way by what it has received, not after a time that a slow start would eat
        target = rng.uniform(0.25, 0.9) * total
        wait_until(lambda up=s.uploaded, at=target: up() >= at, 120, "the fetch to be part-way", child)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        before = s.uploaded()
        notes = Notes()
        result = fetch(build_request(str(tiny_torrent), options=FetchOptions(
            peers=PeerOptions(listen="127.0.0.1:0", peers=tuple(s.listen)))),
                       dest, progress=notes)
        assert {f.path: f.sha256 for f in result.manifest.files} == expected
        if before >= total:
            continue  # the first run had finished downloading before the kill
        refetched = s.uploaded() - total  # bytes served twice
        print(f"kill -9 run {run}: {before:,} bytes before the kill, {refetched:,} fetched again, "
              f"{notes.lines[-1] if notes.lines else ''}")
        # what may be lost: the transfer since the last resume save, and partial pieces
        bound = RATE * (RESUME_EVERY + 1.0) + 2 * piece
        assert refetched <= bound, (run, before, refetched, bound, notes.lines)
        resumed_runs += any(" 0 bytes resumed" not in n for n in notes.lines if "bytes resumed" in n)
    assert resumed_runs >= 1 or runs < 2, "no run resumed anything: the test proved nothing"


def test_peers_from_dns(tiny_hf_dir: Path, tiny_torrent: Path, seeder: Seeder, tmp_path: Path) -> None:
    """`--peers-from-dns localhost:PORT` finds the seeder through the name's A records."""
    s = seeder(tiny_hf_dir, torrent=tiny_torrent.read_bytes())
    port = s.listen[0].rsplit(":", 1)[1]
    dest = tmp_path / "got"
    result = fetch(build_request(str(tiny_torrent), options=FetchOptions(
        peers=PeerOptions(listen="127.0.0.1:0", peers_from_dns=f"localhost:{port}"))), dest)
    assert len(result.fetched) == 3
    assert ("127.0.0.1", int(port)) in PeerSource.from_options(dns=f"localhost:{port}").endpoints()


def test_peer_and_duration_parsing() -> None:
    assert parse_endpoint("10.0.0.1:6881") == ("10.0.0.1", 6881)
    assert parse_endpoint("[::1]:7000") == ("::1", 7000)
    assert parse_endpoint("seeders.ns.svc", default_port=6881) == ("seeders.ns.svc", 6881)
    assert parse_duration("10m") == 600 and parse_duration("forever") == float("inf")
    for bad in ("nohost", "::1:80", "h:0", "h:x"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
