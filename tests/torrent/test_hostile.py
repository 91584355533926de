"""Hostile torrents and peers: refused before anything is written; bad peers banned."""

from __future__ import annotations

import os
from pathlib import Path

import libtorrent as lt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_clean_failure, run_cli
from tests.torrent.conftest import Seeder
from tests.torrent.hostile import HOSTILE_PATHS, OVER_LIMITS, CorruptPeer, info, torrent
from weightship.errors import TorrentMetadataError, TorrentStalledError, UnsafePathError
from weightship.fetch import FetchOptions, PeerOptions, TorrentOptions, build_request, fetch
from weightship.manifest import Manifest
from weightship.paths import safe_relpath
from weightship.progress import Progress
from weightship.torrent.create import create_torrent
from weightship.torrent.metadata import load_torrent_bytes


class Notes(Progress):
    """Keeps the notes a fetch reports (bans among them)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, message: str) -> None:
        self.lines.append(message)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(HOSTILE_PATHS) + sorted(OVER_LIMITS))
def test_hostile_torrent_is_refused_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    data = {**HOSTILE_PATHS, **OVER_LIMITS}[case]
    (tmp_path / "evil.torrent").write_bytes(data)
    before = _snapshot(tmp_path.parent)
    expected = TorrentMetadataError if case in OVER_LIMITS else UnsafePathError
    with pytest.raises(expected):
        load_torrent_bytes(data, case)
    r = run_cli("fetch", tmp_path / "evil.torrent", "--to", tmp_path / "dest", "--peer", "127.0.0.1:9")
    assert_clean_failure(r, 1)
    written = _snapshot(tmp_path.parent) - before
    # at most the destination and its lock; no payload file anywhere
    assert {w for w in written if not w.startswith(f"{tmp_path.name}/dest/.weightship")} <= {
        f"{tmp_path.name}/dest", f"{tmp_path.name}/dest/.weightship"}, written
    assert not (tmp_path.parent / "evil").exists()


def _serve_raw(session: lt.session, data: bytes, save: Path) -> lt.torrent_handle:
    atp = lt.add_torrent_params()
    limits: dict[str, int] = {"max_buffer_size": 64 << 20, "max_decode_tokens": 10_000_000}
    atp.ti = lt.torrent_info(data, limits)  # type: ignore[call-overload]
    atp.save_path = str(save)
    return session.add_torrent(atp)


def _raw_seeder_session() -> lt.session:
    return lt.session({"listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False,
                       "max_metadata_size": 64 << 20, "allow_multiple_connections_per_ip": True})


def test_hostile_magnet_metadata_is_refused_before_download(tmp_path: Path) -> None:
    """A peer serves metadata with a `..` path: the leecher refuses it, writing nothing."""
    data = HOSTILE_PATHS["dotdot"]
    session = _raw_seeder_session()
    handle = _serve_raw(session, data, tmp_path / "seed")
    magnet = lt.make_magnet_uri(handle.torrent_file())
    with pytest.raises(UnsafePathError):
        fetch(build_request(magnet, options=FetchOptions(peers=PeerOptions(
            listen="127.0.0.1:0", peers=(f"127.0.0.1:{session.listen_port()}",)))), tmp_path / "dest")
    assert not [p for p in (tmp_path / "dest").rglob("*") if p.is_file() and ".weightship" not in p.parts]
    assert not (tmp_path / "evil").exists()


def test_magnet_metadata_over_the_size_limit_is_not_accepted(tmp_path: Path) -> None:
    data = lt.bencode({b"info": info(padding=b"x" * (9 << 20))})
    session = _raw_seeder_session()
    handle = _serve_raw(session, data, tmp_path / "seed")
    magnet = lt.make_magnet_uri(handle.torrent_file())
    with pytest.raises(TorrentStalledError):
        fetch(build_request(magnet, options=FetchOptions(
            peers=PeerOptions(listen="127.0.0.1:0", peers=(f"127.0.0.1:{session.listen_port()}",)),
            torrent=TorrentOptions(metadata_timeout=5))), tmp_path / "dest")


def test_corrupt_seeder_is_banned_and_the_fetch_completes(tiny_hf_dir: Path, tiny_torrent: Path,
                                                           seeder: Seeder, tmp_path: Path) -> None:
    meta = load_torrent_bytes(tiny_torrent.read_bytes(), "tiny")
    # The honest seeder is rate-limited so that the corrupt one gets requests too.
    honest = seeder(tiny_hf_dir, torrent=tiny_torrent.read_bytes(), upload_limit=8 << 20)
    expected = {f.path: f.sha256 for f in Manifest.load(tiny_hf_dir).files}
    runs = int(os.environ.get("WEIGHTSHIP_TORRENT_BAN_RUNS", "3"))
    banned = 0
    for run in range(runs):
        bad = CorruptPeer(bytes.fromhex(meta.infohash), meta.info.num_pieces())
        try:
            notes = Notes()
            options = FetchOptions(peers=PeerOptions(listen="127.0.0.1:0", peers=(bad.address, honest.listen[0])))
            result = fetch(build_request(str(tiny_torrent), options=options), tmp_path / f"run{run}", progress=notes)
            assert {f.path: f.sha256 for f in result.manifest.files} == expected
            if bad.blocks_sent:  # it got to send data: then it must have been banned
                assert any(n.startswith(f"banned peer {bad.address}") for n in notes.lines), (run, notes.lines)
                banned += 1
        finally:
            bad.close()
    assert banned >= 1, "the corrupt peer never got to send a block: the test proved nothing"


# ---- fuzzing: any bytes either load as a safe torrent or are refused with a typed error ------

_name = st.one_of(st.sampled_from([b"..", b".", b"", b"/", b"C:", b"a\\b", b"\x00", b".weightship", b"ok"]),
                  st.binary(min_size=0, max_size=12))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_name, min_size=1, max_size=4), min_size=1, max_size=4),
       st.sampled_from([b"", b"l", b"p", b"x"]))
def test_fuzz_file_lists(paths: list[list[bytes]], attr: bytes) -> None:
    files = [{b"length": 7, b"path": p, **({b"attr": attr} if attr else {})} for p in paths]
    try:
        meta = load_torrent_bytes(torrent(info(files)), "fuzz")
    except (TorrentMetadataError, UnsafePathError):
        return
    for f in meta.files:
        safe_relpath(f.path)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=0, max_value=4000), st.binary(min_size=1, max_size=8))
def test_fuzz_bytes(junk: bytes, at: int, patch: bytes) -> None:
    valid = torrent(info([{b"length": 10, b"path": [b"a", b"b.bin"]}]))
    for data in (junk, valid[:at] + patch + valid[at + len(patch):]):
        try:
            meta = load_torrent_bytes(data, "fuzz")
        except (TorrentMetadataError, UnsafePathError):
            continue
        for f in meta.files:
            safe_relpath(f.path)


def test_fuzz_accepts_what_create_makes(tiny_hf_dir: Path) -> None:
    """The fuzz tests can fail: a real torrent must load (guards against refusing everything)."""
    assert len(load_torrent_bytes(create_torrent(tiny_hf_dir).data, "real").files) == 3
