"""Host keys: unknown ones are refused until trusted, changed ones always; nothing reaches the node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nodelab import Lab

from tests.conftest import assert_clean_failure, run_cli


@pytest.fixture(scope="module")
def lab1(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Lab]:
    with Lab(1, tmp_path_factory.mktemp("lab1")) as lab:
        yield lab


def untouched(lab: Lab) -> None:
    node = lab.nodes[0]
    assert node.sh("ls -A /opt; ls /etc/systemd/system | grep weightship || true").strip() == ""


def test_unknown_keys_are_refused_until_trusted_and_changed_keys_always(lab1: Lab, tmp_path: Path,
                                                                         keys: Path, wheelhouse: Path) -> None:
    node = lab1.nodes[0]
    inventory = lab1.inventory(tmp_path / "nodes.yaml", runtime={"wheelhouse": str(wheelhouse)}, trust=False)
    fingerprint = node.host_key_fingerprint()

    r = run_cli("deploy", "nodes", "weightship-tiny", "-i", inventory, "--api-key-file", keys, "--yes")
    assert_clean_failure(r, code=1)
    assert f"unknown host key {fingerprint}" in r.stderr and "nodes trust node1" in r.stderr
    untouched(lab1)

    r = run_cli("nodes", "trust", "node1", "-i", inventory)  # no terminal to ask on, no --yes
    assert_clean_failure(r, code=2)
    assert fingerprint in r.stderr
    assert not (tmp_path / "known_hosts").exists()

    r = run_cli("--json", "nodes", "trust", "node1", "-i", inventory, "--yes")
    assert r.code == 0, r.stderr
    assert fingerprint in r.stdout and "trusted" in r.stdout
    assert node.address in (tmp_path / "known_hosts").read_text()
    r = run_cli("nodes", "trust", "node1", "-i", inventory, "--yes")
    assert r.code == 0 and "already trusted" in r.stdout

    r = run_cli("nodes", "logs", "-i", inventory, "--name", "nothing-yet")  # the pinned key is accepted
    assert r.code == 0, r.stderr

    node.new_host_keys()
    changed = node.host_key_fingerprint()
    assert changed != fingerprint
    for args in (["deploy", "nodes", "weightship-tiny", "-i", inventory, "--api-key-file", keys, "--yes"],
                 ["nodes", "status", "-i", inventory], ["nodes", "trust", "node1", "-i", inventory, "--yes"]):
        r = run_cli(*args)
        assert_clean_failure(r, code=1)
        assert "HOST KEY CHANGED" in r.stderr and fingerprint in r.stderr and changed in r.stderr, r.stderr
    assert changed not in (tmp_path / "known_hosts").read_text()
    untouched(lab1)


def test_a_fingerprint_in_the_inventory_pins_the_key(lab1: Lab, tmp_path: Path, wheelhouse: Path) -> None:
    node = lab1.nodes[0]
    inventory = lab1.inventory(tmp_path / "nodes.yaml", runtime={"wheelhouse": str(wheelhouse)}, trust=False)
    pinned = inventory.read_text().replace("gpus: 0", f"gpus: 0\n    host_keys: ['{node.host_key_fingerprint()}']")
    inventory.write_text(pinned)
    r = run_cli("nodes", "logs", "-i", inventory, "--name", "nothing-yet")
    assert r.code == 0, r.stderr
