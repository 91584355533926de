"""Swarm fetches on a fleet in network namespaces (tests/fleet.py): every node ends with the
verified model while the origin sends about one copy, whatever the origin, and whatever a peer
does (lies, dies, restarts) or the origin does (goes away). Needs root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import assert_same_files
from tests.fleet import Fleet
from tests.net import wait_until
from tests.swarm.conftest import CHUNK_MIB, PORT, Fetch, model_bytes, start_fetch, start_origin
from weightship.fetch.journal import JOURNAL_SUFFIX, Journal

MakeFleet = Callable[..., Fleet]


def _run_swarm(fleet: Fleet, origin_ref: object, tmp_path: Path, **kw: object) -> list[dict[str, object]]:
    fetches = [start_fetch(node, origin_ref, tmp_path / node.name, fleet.nodes, home=tmp_path / f"home-{node.name}",  # type: ignore[arg-type]
                           **kw) for node in fleet.nodes]  # type: ignore[arg-type]
    return [f.result() for f in fetches]


@pytest.mark.parametrize("kind", ["hub", "s3", "https"])
def test_four_nodes_take_one_copy_from_the_origin(kind: str, make_fleet: MakeFleet, small_model: Path,
                                                  tmp_path: Path) -> None:
    fleet = make_fleet(4)
    assert fleet.origin is not None
    origin = start_origin(kind, fleet, small_model, tmp_path / "store")
    before = fleet.origin.sent()
    results = _run_swarm(fleet, origin, tmp_path, extra=["--seed-for", "60s"])
    size = model_bytes(small_model)
    sent = fleet.origin.sent() - before
    for node in fleet.nodes:
        assert_same_files(small_model, tmp_path / node.name)
    # The origin's link carried well under two copies (headers and the plan's requests included),
    # where four plain fetches would have made it carry four.
    assert sent < 1.5 * size, (sent, size)
    took = sum(int(r["origin_bytes"]) for r in results)  # type: ignore[call-overload]
    assert size <= took <= sent, (took, sent)
    assert sum(int(r["peer_bytes"]) for r in results) >= 4 * size - took  # type: ignore[call-overload]
    # every file's bytes are accounted for, per file
    for r in results:
        traffic = r["files_traffic"]
        assert isinstance(traffic, dict)
        for path, t in traffic.items():
            assert t["origin"] + t["peers"] >= (tmp_path / fleet.nodes[0].name / path).stat().st_size


@pytest.mark.parametrize("mode", ["consistent", "inconsistent"])
def test_a_lying_peer_is_banned_and_every_node_ends_correct(mode: str, make_fleet: MakeFleet, small_model: Path,
                                                            tmp_path: Path) -> None:
    """A peer that says it has every chunk and serves one flipped bit per chunk: with the true
    chunk digests it is caught at its first chunk; with digests of its own bytes, by the file's
    sha256, after which the chunks it vouched for come from the good peers or the origin."""
    fleet = make_fleet(4)
    assert fleet.origin is not None
    origin = start_origin("hub", fleet, small_model, tmp_path / "store")
    liar = fleet.nodes[3]
    (tmp_path / "liar").mkdir()
    hostile = liar.popen([sys.executable, "-m", "tests.swarm.hostile", small_model,
                          "--listen", f"{liar.address}:{PORT}", "--chunk", str(CHUNK_MIB << 20), "--mode", mode,
                          "--work", tmp_path / "liar"],
                         stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    assert hostile.stdout is not None and hostile.stdout.readline().strip() == "ready"
    before = fleet.origin.sent()
    good = fleet.nodes[:3]
    fetches = [start_fetch(n, origin, tmp_path / n.name, fleet.nodes, home=tmp_path / f"home-{n.name}",
                           extra=["--seed-for", "60s"]) for n in good]
    results = [f.result() for f in fetches]
    hostile.terminate()
    hostile.wait(10)
    size = model_bytes(small_model)
    for n, r in zip(good, results, strict=True):
        assert_same_files(small_model, tmp_path / n.name)
        banned = r["banned_peers"]
        assert isinstance(banned, dict)
        assert f"{liar.address}:{PORT}" in banned, banned  # dropped, with the reason
        assert all(not key.startswith(tuple(g.address + ":" for g in good)) for key in banned), banned
    # What the liar claimed to have came, once it was caught, from the good peers or the origin,
    # and catching it cost the origin nothing: it sent about one copy of the model (a chunk is
    # 1/8 of it), however the three nodes' repairs overlapped.
    assert fleet.origin.sent() - before < 1.5 * size, (fleet.origin.sent() - before, size)


def test_a_peer_killed_mid_transfer(make_fleet: MakeFleet, small_model: Path, tmp_path: Path) -> None:
    fleet = make_fleet(4, rate_mbit=40)  # 8 MiB take about 2 s on a link: time to kill one
    assert fleet.origin is not None
    origin = start_origin("hub", fleet, small_model, tmp_path / "store")
    # --seed-for: the survivors serve each other until all of them have the model, and wait for
    # the dead node (it might come back) only that long
    # --peer-wait: the four take their chunks from each other, not from the origin, however late
    # one of them starts on a loaded machine (all four answer at once when it is quiet)
    fetches = [start_fetch(n, origin, tmp_path / n.name, fleet.nodes, home=tmp_path / f"home-{n.name}",
                           extra=["--seed-for", "5s", "--peer-wait", "30"]) for n in fleet.nodes]
    victim = fleet.nodes[1]
    wait_until(lambda: victim.sent() > (1 << 20), 60, "node2 to serve its peers a chunk",
               fetches[1].proc)  # type: ignore[arg-type]
    os.kill(fetches[1].proc.pid, signal.SIGKILL)
    fetches[1].proc.wait()
    survivors = [f for i, f in enumerate(fetches) if i != 1]
    for f in survivors:
        f.result()
        assert_same_files(small_model, f.dest)


def test_the_origin_gone_once_a_node_has_the_model(make_fleet: MakeFleet, small_model: Path, tmp_path: Path) -> None:
    """The first node fetches alone and serves; then the origin's link is cut, and the other
    nodes, their digests from a manifest the operator gave, finish from the peers."""
    fleet = make_fleet(4)
    assert fleet.origin is not None
    origin = start_origin("https", fleet, small_model, tmp_path / "store")
    manifest = ["--manifest", str(small_model / ".weightship/manifest.json")]
    first = start_fetch(fleet.nodes[0], origin, tmp_path / "node1", fleet.nodes, home=tmp_path / "home-node1",
                        extra=["--seed-for", "120s", *manifest])
    wait_until(lambda: (tmp_path / "node1/.weightship/manifest.json").exists(), 60, "node1 to verify the model",
               first.proc)  # type: ignore[arg-type]
    fleet.origin.link(False)
    cut = fleet.origin.sent()
    rest = [start_fetch(n, origin, tmp_path / n.name, fleet.nodes, home=tmp_path / f"home-{n.name}",
                        extra=["--seed-for", "120s", *manifest]) for n in fleet.nodes[1:]]
    results = [f.result() for f in rest]
    first.result()
    for n, r in zip(fleet.nodes[1:], results, strict=True):
        assert_same_files(small_model, tmp_path / n.name)
        assert r["origin_bytes"] == 0 and r["peer_bytes"] == model_bytes(small_model), r
    assert fleet.origin.sent() == cut


def test_a_node_restarted_mid_fetch_resumes(make_fleet: MakeFleet, small_model: Path, tmp_path: Path) -> None:
    fleet = make_fleet(4, rate_mbit=40)
    assert fleet.origin is not None
    origin = start_origin("hub", fleet, small_model, tmp_path / "store")

    def start(i: int) -> Fetch:
        n = fleet.nodes[i]
        return start_fetch(n, origin, tmp_path / n.name, fleet.nodes, home=tmp_path / f"home-{n.name}",
                           extra=["--seed-for", "60s"])

    fetches = [start(i) for i in range(4)]
    node = fleet.nodes[2]

    def journaled() -> int:  # chunks node3's journals list as on disk (what a restart keeps)
        journals = (Journal.load(j) for j in (tmp_path / node.name).rglob("*" + JOURNAL_SUFFIX))
        return sum(len(j.done) for j in journals if j is not None)  # None: gone meanwhile (verified)

    wait_until(lambda: node.received() > (4 << 20) and journaled() >= 2, 60, "node3 to have half the model",
               fetches[2].proc)  # type: ignore[arg-type]
    os.kill(fetches[2].proc.pid, signal.SIGKILL)
    fetches[2].proc.wait()
    fetches[2] = start(2)
    results = [f.result() for f in fetches]
    for n in fleet.nodes:
        assert_same_files(small_model, tmp_path / n.name)
    resumed = results[2]["resumed_bytes"]
    assert isinstance(resumed, int) and resumed >= (1 << 20), results[2]
    # what it had before the restart was not fetched again
    assert int(results[2]["origin_bytes"]) + int(results[2]["peer_bytes"]) <= model_bytes(small_model) - resumed + (  # type: ignore[call-overload]
        4 << 20)
