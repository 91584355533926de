"""``weightship torrent create``: hybrid and v1 torrents, piece sizes, trackers, web seeds, digests."""

from __future__ import annotations

import json
from pathlib import Path

import libtorrent as lt
import pytest

from tests.conftest import assert_clean_failure, run_cli
from weightship.manifest import Manifest
from weightship.torrent.create import create_torrent, piece_size_for
from weightship.torrent.metadata import SHA256_KEY, load_torrent_bytes


def test_piece_size_scales_with_the_model() -> None:
    assert piece_size_for(17_000_000) == 256 << 10
    mistral = 14_483_498_040
    size = piece_size_for(mistral)
    assert size == 16 << 20 and mistral // size < 1000, size
    assert piece_size_for(1 << 50) == 16 << 20  # capped: a bad piece never costs more than 16 MiB


@pytest.mark.filterwarnings("ignore:.*is deprecated:DeprecationWarning")  # trackers(), web_seeds()
def test_hybrid_by_default_with_the_manifest_digests(tiny_hf_dir: Path) -> None:
    created = create_torrent(tiny_hf_dir, trackers=["http://127.0.0.1:1/announce"],
                             webseeds=["http://127.0.0.1:2/"])
    info = created.meta.info
    assert info.info_hashes().has_v1() and info.info_hashes().has_v2()
    assert "urn:btmh:" in created.magnet and "urn:btih:" in created.magnet
    assert [t.url for t in info.trackers()] == ["http://127.0.0.1:1/announce"]
    assert [w["url"] for w in info.web_seeds()] == ["http://127.0.0.1:2/"]
    manifest = Manifest.load(tiny_hf_dir)
    assert created.meta.sha256 == {f.path: f.sha256 for f in manifest.files}
    assert sorted(f.path for f in created.meta.files) == sorted(f.path for f in manifest.files)
    assert b".weightship" not in info.info_section()  # the state directory is never published


def test_v1_only(tiny_hf_dir: Path) -> None:
    created = create_torrent(tiny_hf_dir, v1_only=True, piece_size=64 << 10)
    info = created.meta.info
    assert info.info_hashes().has_v1() and not info.info_hashes().has_v2()
    assert info.piece_length() == 64 << 10
    assert not created.meta.pad_files
    assert SHA256_KEY in lt.bdecode(info.info_section())


def test_cli_create(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.torrent"
    r = run_cli("torrent", "create", tiny_hf_dir, "--out", out, "--v1-only", "--tracker",
                "http://127.0.0.1:1/announce", "--json")
    assert r.code == 0, r
    result = json.loads(r.stdout)
    meta = load_torrent_bytes(out.read_bytes(), "t")
    assert result["infohash"] == meta.infohash and result["infohash_v2"] is None
    assert result["files"] == 3 and result["piece_size"] == 256 << 10


def test_cli_create_refuses_a_directory_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"x")
    assert_clean_failure(run_cli("torrent", "create", tmp_path, "--out", tmp_path / "t.torrent"))
    assert_clean_failure(run_cli("torrent", "create", tmp_path, "--piece-size", "1000"))
