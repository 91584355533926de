"""A swarm on loopback (no namespaces, no root): three fetch processes and a web server origin.
The fleet tests (test_fleet.py) cover each origin kind and the faults on a real bridge."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import assert_clean_failure, assert_same_files, run_cli
from tests.fetch.webserver import FileServer
from tests.net import free_port
from weightship.manifest import Manifest


@pytest.fixture
def origin(small_model: Path, tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "origin"
    shutil.copytree(small_model, root / "m")
    server = FileServer(root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_three_nodes_on_loopback(origin: FileServer, small_model: Path, tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    procs = []
    for i, port in enumerate(ports):
        peers = [a for p in ports if p != port for a in ("--peer", f"127.0.0.1:{p}")]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "weightship", *(["--json"] if i else []), "fetch", origin.url + "m/",
             "--to", tmp_path / f"n{i}", "--manifest", small_model / ".weightship/manifest.json", "--chunk-mib", "1",
             "--listen", f"127.0.0.1:{port}", *peers, "--seed-for", "60s"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    size = Manifest.load(small_model).total_bytes
    for i in range(3):
        assert_same_files(small_model, tmp_path / f"n{i}")
    assert origin.bytes_served < 1.5 * size
    results = [json.loads(out) for out, _ in outs[1:]]
    for r in results:
        assert r["origin_bytes"] + r["peer_bytes"] >= size
        assert sum(r["from_peers"].values()) == r["peer_bytes"]
    # the first node printed a summary for people: where its bytes came from
    assert "bytes from the origin" in outs[0][0] and "sent to peers" in outs[0][0]


def test_a_listen_address_in_use_is_one_error(small_model: Path, origin: FileServer, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("fetch", origin.url + "m/", "--to", tmp_path / "d", "--manifest",
                    small_model / ".weightship/manifest.json", "--listen", f"127.0.0.1:{port}")
    assert_clean_failure(r, 1)
    assert "cannot listen for peers" in r.stderr and "--listen" in r.stderr


@pytest.mark.parametrize("args", [["--peer", "10.0.0.1"], ["--peer", "10.0.0.1:99999"], ["--listen", "0.0.0.0:x"],
                                  ["--peer", "::1:6881"]])
def test_malformed_peers_are_usage_errors(args: list[str], origin: FileServer, small_model: Path,
                                          tmp_path: Path) -> None:
    r = run_cli("fetch", origin.url + "m/", "--to", tmp_path / "d", "--manifest",
                small_model / ".weightship/manifest.json", *args)
    assert_clean_failure(r, 2)


def test_seed_serves_a_verified_directory_to_the_swarm(origin: FileServer, small_model: Path, tmp_path: Path) -> None:
    """``weightship seed`` of a directory fetched from a web server speaks the swarm's protocol
    (auto), so a fetch given it as a peer needs nothing from the origin; a damaged file is not
    served."""
    manifest = small_model / ".weightship/manifest.json"
    first = run_cli("fetch", origin.url + "m/", "--to", tmp_path / "seeded", "--manifest", manifest)
    assert first.code == 0, first.stderr
    port = free_port()
    seeder = subprocess.Popen([sys.executable, "-m", "weightship", "seed", tmp_path / "seeded", "--listen",
                               f"127.0.0.1:{port}", "--for", "120s", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert seeder.stdout is not None
        ready = json.loads(seeder.stdout.readline())
        assert ready["protocol"] == "swarm" and ready["files"] == 2
        served_before = origin.bytes_served
        r = run_cli("--json", "fetch", origin.url + "m/", "--to", tmp_path / "from-seed", "--manifest", manifest,
                    "--peer", f"127.0.0.1:{port}")
        assert r.code == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["origin_bytes"] == 0 and out["peer_bytes"] == Manifest.load(small_model).total_bytes
        assert origin.bytes_served == served_before
        assert_same_files(small_model, tmp_path / "from-seed")
    finally:
        seeder.terminate()
        seeder.wait(10)
    damaged = tmp_path / "seeded/model-00002-of-00002.safetensors"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 1
    damaged.write_bytes(bytes(data))
    r = run_cli("seed", tmp_path / "seeded", "--listen", f"127.0.0.1:{free_port()}", "--for", "5s")
    assert_clean_failure(r, 1)
    assert "model-00002-of-00002.safetensors do not match the manifest" in r.stderr
