"""Fetch options: one default per setting, built once from the flags, bad values a usage error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import assert_clean_failure, run_cli
from weightship.errors import UsageError
from weightship.fetch import FetchOptions, PeerOptions, TorrentOptions, TransferOptions
from weightship.fetch.options import SWARM_CHUNK, build_options


def test_flags_land_in_their_groups() -> None:
    o = build_options(revision="abc1234", manifest=Path("m.json"), trust_keys=[Path("k.pub")],
                      connections=8, chunk_size=1 << 20, stall_timeout=5.0, listen="0.0.0.0:6881",
                      peers=["10.0.0.2:6881"], peer_wait=0.5, trackers=["http://t/announce"],
                      seed_for="10m")
    assert (o.revision, o.manifest, o.trust_keys) == ("abc1234", Path("m.json"), (Path("k.pub"),))
    assert (o.transfer.connections, o.transfer.chunk_size, o.transfer.stall_timeout) == (8, 1 << 20, 5.0)
    assert o.transfer.parallel_files == TransferOptions.parallel_files  # not given: the default
    assert (o.peers.listen, o.peers.peers, o.peers.wait, o.peers.seed_for) == (
        "0.0.0.0:6881", ("10.0.0.2:6881",), 0.5, 600.0)
    # --stall-timeout, when given, is the torrent's too; else each keeps its own default
    assert o.torrent == TorrentOptions(trackers=("http://t/announce",), stall_timeout=5.0)
    assert build_options().torrent.stall_timeout == 300.0 and build_options().transfer.stall_timeout == 30.0


def test_a_fetch_with_peers_reads_smaller_chunks_unless_told() -> None:
    assert build_options().transfer.chunk_size == 16 << 20
    assert build_options(peers=["h:1"]).transfer.chunk_size == SWARM_CHUNK
    assert build_options(listen="0.0.0.0:0").transfer.chunk_size == SWARM_CHUNK
    assert build_options(peers=["h:1"], chunk_size=8 << 20).transfer.chunk_size == 8 << 20
    assert not FetchOptions().peers.wanted and build_options(peers_from_dns="seeds").peers.wanted


@pytest.mark.parametrize("make", [
    lambda: TransferOptions(connections=0),
    lambda: TransferOptions(chunk_size=100),
    lambda: TransferOptions(stall_timeout=0),
    lambda: TransferOptions(requests=-1),
    lambda: PeerOptions(peers=("no-port",)),
    lambda: PeerOptions(peers=("::1:80",)),
    lambda: TorrentOptions(metadata_timeout=0),
    lambda: build_options(seed_for="soon"),
])
def test_nonsense_is_a_usage_error(make: Callable[[], object]) -> None:
    with pytest.raises(UsageError):
        make()


def test_cli_refuses_a_bad_peer_before_touching_the_destination(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    r = run_cli("fetch", "weightship-tiny", "--to", dest, "--peer", "10.0.0.1")
    assert_clean_failure(r, 2)
    assert "HOST:PORT" in r.stderr
    assert not dest.exists()
