"""Fetching over BitTorrent from libtorrent seeders on loopback: .torrent, magnet, card, swarm."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from tests.conftest import assert_clean_failure, run_cli
from tests.torrent.conftest import Seeder
from weightship.catalog import load_card, parse_card
from weightship.errors import DigestMismatchError
from weightship.fetch import FetchOptions, FetchRequest, PeerOptions, build_request, fetch
from weightship.manifest import Manifest
from weightship.paths import STATE_DIR
from weightship.torrent.create import create_torrent


def _loopback(peers: Sequence[str], **more: Any) -> FetchOptions:
    """Options for a fetch listening on loopback, with these peers."""
    return FetchOptions(peers=PeerOptions(listen="127.0.0.1:0", peers=tuple(peers)), **more)


def _same_files(a: Path, b: Path) -> None:
    ma, mb = Manifest.load(a), Manifest.load(b)
    assert [(f.path, f.size, f.sha256) for f in ma.files] == [(f.path, f.size, f.sha256) for f in mb.files]
    for f in ma.files:
        assert (a / f.path).read_bytes() == (b / f.path).read_bytes(), f.path


def test_fetch_a_torrent_file_with_the_cli(tiny_hf_dir: Path, tiny_torrent: Path, tmp_path: Path) -> None:
    """`weightship seed` and `weightship fetch X.torrent --peer` as separate processes; verify passes."""
    seed = subprocess.Popen([sys.executable, "-m", "weightship", "seed", str(tiny_hf_dir), "--torrent",
                             str(tiny_torrent), "--listen", "127.0.0.1:0", "--for", "120", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert seed.stdout is not None
        ready = json.loads(seed.stdout.readline())
        dest = tmp_path / "got"
        r = run_cli("fetch", tiny_torrent, "--to", dest, "--peer", ready["listen"][0], "--json")
        assert r.code == 0, r
        out = json.loads(r.stdout)
        assert sorted(out["fetched"]) == ["config.json", "model.safetensors", "tokenizer.model"]
        assert out["manifest"]["source"]["infohash"] == ready["infohash"]
        assert {f["anchor"] for f in out["manifest"]["files"]} == {"torrent"}
        # every byte came from the peer (issue 17, item 8: this said 0); a v1+v2 hybrid torrent
        # pads each file to a piece boundary, and the pads travel too
        total = Manifest.load(tiny_hf_dir).total_bytes
        assert total <= out["downloaded_bytes"] <= total + 3 * lt.torrent_info(str(tiny_torrent)).piece_length()
        assert out["resumed_bytes"] == 0
        _same_files(tiny_hf_dir, dest)
        assert run_cli("verify", dest).code == 0
        assert not (dest / STATE_DIR / "incoming").exists()  # nothing left half-way
    finally:
        seed.terminate()
        seed.wait(30)


def test_fetch_a_magnet_link_from_peers(tiny_hf_dir: Path, seeder: Seeder, tmp_path: Path) -> None:
    s = seeder(tiny_hf_dir)
    dest = tmp_path / "got"
    result = fetch(build_request(s.magnet, options=_loopback(s.listen)), dest)
    assert result.manifest.source is not None and result.manifest.source.infohash == s.infohash
    _same_files(tiny_hf_dir, dest)
    # the kept torrent lets `weightship seed DIR` serve the same swarm without --torrent
    assert (dest / STATE_DIR / "source.torrent").is_file()


def test_fetch_from_three_seeders(tiny_hf_dir: Path, tiny_torrent: Path, seeder: Seeder, tmp_path: Path) -> None:
    data = tiny_torrent.read_bytes()
    seeds = [seeder(tiny_hf_dir, torrent=data) for _ in range(3)]
    dest = tmp_path / "got"
    fetch(build_request(str(tiny_torrent), options=_loopback([s.listen[0] for s in seeds])), dest)
    _same_files(tiny_hf_dir, dest)


def test_only_the_planned_files_are_downloaded(tiny_hf_dir: Path, tiny_torrent: Path, seeder: Seeder,
                                               tmp_path: Path) -> None:
    s = seeder(tiny_hf_dir, torrent=tiny_torrent.read_bytes())
    dest = tmp_path / "got"
    result = fetch(FetchRequest(ref=str(tiny_torrent), include=("*.json", "tokenizer.*"),
                                options=_loopback(s.listen)), dest)
    assert sorted(result.fetched) == ["config.json", "tokenizer.model"]
    assert not (dest / "model.safetensors").exists()
    written = sum(p.stat().st_blocks * 512 for p in dest.rglob("*") if p.is_file())
    assert written < 4 << 20, written  # the 17 MB weights file was not downloaded


def test_catalog_card_torrent_source(tiny_hf_dir: Path, seeder: Seeder, tmp_path: Path) -> None:
    """A card whose source is a torrent: the card's pinned sha256 is the anchor."""
    created = create_torrent(tiny_hf_dir, v1_only=True)
    s = seeder(tiny_hf_dir, torrent=created.data)
    raw = dict(load_card("weightship-tiny").raw)
    raw["layouts"] = {"hf": {**raw["layouts"]["hf"], "torrent": {"infohash": created.meta.infohash}}}
    raw["sources"] = [{"kind": "torrent", "layout": "hf", "magnet": created.magnet}]
    card = parse_card(raw, "test card")
    dest = tmp_path / "got"
    result = fetch(FetchRequest(ref=card.name, card=card, options=_loopback(s.listen)), dest)
    assert {f.anchor for f in result.manifest.files} == {"catalog"}
    _same_files(tiny_hf_dir, dest)


def test_a_torrent_without_digests_is_trusted_by_its_piece_hashes(tiny_hf_dir: Path, seeder: Seeder,
                                                                 tmp_path: Path) -> None:
    """Like the original Mistral release: no sha256 published, only the infohash."""
    created = create_torrent(tiny_hf_dir, v1_only=True)
    torrent = lt.bdecode(created.data)
    del torrent[b"info"][b"x-weightship-sha256"]
    data = lt.bencode(torrent)
    s = seeder(tiny_hf_dir, torrent=data)
    (tmp_path / "bare.torrent").write_bytes(data)
    dest = tmp_path / "got"
    result = fetch(build_request(str(tmp_path / "bare.torrent"), options=_loopback(s.listen)), dest)
    assert {f.anchor for f in result.manifest.files} == {"torrent"}
    # streamed from the torrent's own store to the engine: counted once, as the peers sent it
    assert result.downloaded_bytes == Manifest.load(tiny_hf_dir).total_bytes
    _same_files(tiny_hf_dir, dest)


def test_a_manifest_that_disagrees_with_the_torrent_fails_with_exit_3(
        tiny_hf_dir: Path, tiny_torrent: Path, seeder: Seeder, tmp_path: Path) -> None:
    s = seeder(tiny_hf_dir, torrent=tiny_torrent.read_bytes())
    manifest = Manifest.load(tiny_hf_dir)
    manifest.files[0].sha256 = "0" * 64
    manifest.write(tmp_path / "other")
    dest = tmp_path / "got"
    with pytest.raises(DigestMismatchError):
        fetch(build_request(str(tiny_torrent), options=_loopback(
            s.listen, manifest=tmp_path / "other")), dest)
    assert not (dest / manifest.files[0].path).exists()
    r = run_cli("fetch", tiny_torrent, "--to", dest, "--peer", s.listen[0], "--manifest", tmp_path / "other")
    assert_clean_failure(r, 3)


def test_no_peer_is_a_clean_error(tiny_torrent: Path, tmp_path: Path) -> None:
    r = run_cli("fetch", tiny_torrent, "--to", tmp_path / "got", "--peer", "127.0.0.1:9",
                "--stall-timeout", "3")
    assert_clean_failure(r, 1)
    assert "no data arrived" in r.stderr
