"""``weightship deploy nodes`` against four real nodes (systemd + sshd in network namespaces).

The tests run in order on one lab, each starting from what the one before left, as an operator's
day would: plan, first rollout, a no-op rerun, a release that fails its gate, a node lost
mid-rollout, a deployer killed mid-rollout, a held lock, status, logs, rollback, uninstall.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml
from conftest import KEY
from nodelab import Lab, Node

from tests.conftest import Result, assert_clean_failure, run_cli
from tests.net import free_port, listening, wait_until
from weightship.deploy.nodes.lock import LOCK_LEASE_S
from weightship.fetch import build_request, fetch

NAME = "tiny"
PREFIX = "/opt/weightship"


@dataclass
class Fleet:
    lab: Lab
    inventory: Path
    keys: Path

    def deploy(self, *extra: str, model: str = "weightship-tiny") -> Result:
        return run_cli("--json", "deploy", "nodes", model, "-i", self.inventory, "--name", NAME, "--gpus", "0",
                       "--api-key-file", self.keys, "--gate-timeout", "300", *extra, timeout=900)

    def deploy_in_background(self, *extra: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHIP_DEBUG"}
        return subprocess.Popen(
            [sys.executable, "-m", "weightship", "deploy", "nodes", "weightship-tiny", "-i", str(self.inventory),
             "--name", NAME, "--gpus", "0", "--api-key-file", str(self.keys), "--gate-timeout", "300", "--yes",
             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def fleet(lab4: Lab, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("operator")
    keys = work / "keys.txt"
    keys.write_text(f"{KEY}\n")
    yield Fleet(lab4, lab4.inventory(work / "nodes.yaml", runtime={"wheelhouse": str(wheelhouse)}), keys)


def rows(r: Result) -> dict[str, dict[str, str]]:
    return {row["host"]: row for row in json.loads(r.stdout)["hosts"]}


def current(node: Node) -> str:
    return node.sh(f"readlink {PREFIX}/apps/{NAME}/current").strip().removeprefix("releases/")


def main_pid(node: Node) -> int:
    return int(node.sh(f"systemctl show -p MainPID --value weightship-{NAME}.service"))


def chat(node: Node, key: str = KEY) -> str:
    client = openai.OpenAI(base_url=f"http://{node.address}:8000/v1", api_key=key, max_retries=0, timeout=60)
    answer = client.chat.completions.create(model="weightship-tiny", max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": "Hello"}])
    return answer.choices[0].message.content or ""


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 600) -> None:
    """Read the deployer's stderr until a line holds ``text``."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"the deployer never said {text!r}: {''.join(seen)}")


def test_plan_shows_the_change_and_changes_nothing(fleet: Fleet) -> None:
    r = run_cli("deploy", "nodes", "weightship-tiny", "-i", fleet.inventory, "--name", NAME, "--gpus", "0",
                "--api-key-file", fleet.keys, "--plan")
    assert r.code == 0, r.stderr
    for node in fleet.lab.nodes:
        assert f"{node.name}: update" in r.stdout
    assert f"+ExecStart={PREFIX}/apps/{NAME}/current/runtime/bin/weightship serve" in r.stdout
    assert "to fetch" in r.stdout and "to install" in r.stdout
    for node in fleet.lab.nodes:
        assert node.sh(f"ls -A {PREFIX} 2>/dev/null; ls /etc/systemd/system | grep weightship || true").strip() == ""
    r = run_cli("deploy", "nodes", "weightship-tiny", "-i", fleet.inventory, "--api-key-file", fleet.keys)
    assert_clean_failure(r, code=2)  # no terminal to ask on, and no --yes
    assert "--yes" in r.stderr


def test_rollout_to_four_nodes_serves_on_every_one(fleet: Fleet) -> None:
    r = fleet.deploy("--yes", "--max-unavailable", "50%")
    assert r.code == 0, r.stderr
    result = rows(r)
    assert {row["state"] for row in result.values()} == {"updated"}
    revs = {row["new"] for row in result.values()}
    assert len(revs) == 1
    for node in fleet.lab.nodes:
        assert current(node) in revs
        assert chat(node)
        with pytest.raises(openai.AuthenticationError):
            chat(node, key="sk-not-a-key")

    r = run_cli("--json", "nodes", "status", "-i", fleet.inventory, "--name", NAME)
    assert r.code == 0, r.stderr
    status = json.loads(r.stdout)["hosts"]
    assert [s["host"] for s in status] == ["node1", "node2", "node3", "node4"]
    for s in status:
        assert (s["reachable"], s["unit"], s["ready"], s["verified"]) == (True, "active (running)", True, True), s
        assert s["release"] in revs and s["model"].startswith("weightship-tiny")


def test_running_it_again_restarts_nothing(fleet: Fleet) -> None:
    pids = [main_pid(n) for n in fleet.lab.nodes]
    r = fleet.deploy("--yes", "--max-unavailable", "4")
    assert r.code == 0, r.stderr
    assert {row["state"] for row in rows(r).values()} == {"unchanged"}
    assert [main_pid(n) for n in fleet.lab.nodes] == pids


def test_the_api_key_reaches_only_the_credential_file(fleet: Fleet) -> None:
    node = fleet.lab.nodes[0]
    pid = main_pid(node)
    assert node.sh(f"stat -c '%a %U' {PREFIX}/apps/{NAME}/api-keys").split() == ["600", "root"]
    found = node.sh(f"grep -rl -- '{KEY}' /etc/systemd {PREFIX} /run/systemd/transient /tmp /var/tmp "
                    f"/var/lib/weightship 2>/dev/null; true").split()
    assert all(path.endswith("/api-keys") for path in found), found
    assert KEY not in node.sh(f"systemctl show weightship-{NAME}.service")
    assert KEY not in node.sh(f"cat /proc/{pid}/environ | tr '\\0' '\\n'; ps -eo args")
    assert KEY not in node.sh(f"journalctl -u weightship-{NAME}.service --no-pager -o verbose")
    assert KEY not in node.sh("journalctl --no-pager -n 2000")
    user = node.sh(f"stat -c %U /proc/{pid}").strip()
    assert user == f"weightship-{NAME}"  # the service runs as its own user, which cannot read the file
    assert node.sh(f"runuser -u {user} -- cat {PREFIX}/apps/{NAME}/api-keys 2>&1; true").find(KEY) < 0


def test_a_release_that_fails_its_gate_is_rolled_back_and_the_rollout_stops(fleet: Fleet) -> None:
    nodes = fleet.lab.nodes
    before = {n.name: (current(n), main_pid(n)) for n in nodes}
    r = fleet.deploy("--yes", "--layout", "original", "--prepare-only")  # fetch + convert everywhere first
    assert r.code == 0, r.stderr
    assert {row["state"] for row in rows(r).values()} == {"prepared"}
    assert {n.name: (current(n), main_pid(n)) for n in nodes} == before  # staged, nothing switched

    model = nodes[0].sh(f"ls -d {PREFIX}/models/*original*").strip()
    nodes[0].sh(f"printf 'XXXX' | dd of={model}/consolidated.safetensors bs=1 seek=1000 conv=notrunc 2>/dev/null")

    r = fleet.deploy("--yes", "--layout", "original")
    assert_clean_failure(r, code=1)
    result = rows(r)
    assert result["node1"]["state"] == "rolled back", result
    assert "unit exited" in result["node1"]["why"]
    assert {result[n]["state"] for n in ("node2", "node3", "node4")} == {"not started"}
    assert current(nodes[0]) == before["node1"][0]
    assert chat(nodes[0])  # serving its old release again
    for node in nodes[1:]:
        assert (current(node), main_pid(node)) == before[node.name]  # never touched


def test_a_node_lost_mid_rollout_is_reported_unreachable_and_left_as_it_was(fleet: Fleet) -> None:
    nodes = fleet.lab.nodes
    before = {n.name: (current(n), main_pid(n)) for n in nodes}
    proc = fleet.deploy_in_background("--serve-arg=--max-batch=4", "--json")
    try:
        wait_for_line(proc, "node1: switching")
        nodes[2].link(up=False)
        out, _ = proc.communicate(timeout=600)
    finally:
        nodes[2].link(up=True)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    result = {row["host"]: row for row in json.loads(out)["hosts"]}
    assert [result[n]["state"] for n in ("node1", "node2", "node3", "node4")] == \
        ["updated", "updated", "unreachable", "not started"], result
    assert (current(nodes[2]), main_pid(nodes[2])) == before["node3"]  # nothing was stopped on it
    assert chat(nodes[2])
    assert (current(nodes[3]), main_pid(nodes[3])) == before["node4"]
    # The lost deployer's lock on node3 lapses once its heartbeats stop (LOCK_LEASE_S).
    deadline = time.monotonic() + LOCK_LEASE_S * 2 + 10
    while nodes[2].sh(f"flock -n {PREFIX}/.lock true && echo free || true").strip() != "free":
        assert time.monotonic() < deadline, "the lost deployer's lock was never let go"
        time.sleep(1)


def test_a_deployer_killed_mid_rollout_finishes_when_run_again(fleet: Fleet) -> None:
    proc = fleet.deploy_in_background("--serve-arg=--max-batch=2")
    try:
        wait_for_line(proc, "node2: switching")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    r = fleet.deploy("--yes", "--serve-arg=--max-batch=2")
    assert r.code == 0, r.stderr
    result = rows(r)
    assert result["node1"]["state"] == "unchanged"  # done before the kill: not done again
    assert result["node3"]["state"] == result["node4"]["state"] == "updated"
    assert len({current(n) for n in fleet.lab.nodes}) == 1
    for node in fleet.lab.nodes:
        assert chat(node)


def test_a_node_locked_by_another_rollout_is_left_alone(fleet: Fleet) -> None:
    node = fleet.lab.nodes[1]
    before = {n.name: (current(n), main_pid(n)) for n in fleet.lab.nodes}
    holder = node.sh(f"setsid flock {PREFIX}/.lock sleep 600 >/dev/null 2>&1 < /dev/null & echo $!").strip()
    try:
        deadline = time.monotonic() + 10
        while node.sh(f"flock -n {PREFIX}/.lock true && echo free || true").strip() == "free":
            assert time.monotonic() < deadline, "the test's own lock holder never took the lock"
            time.sleep(0.1)
        r = fleet.deploy("--yes", "--serve-arg=--max-batch=3")
        assert_clean_failure(r, code=1)
        assert "another weightship rollout holds this node's lock" in r.stderr + r.stdout
        assert {row["state"] for row in rows(r).values()} <= {"failed", "not started"}
        assert {n.name: (current(n), main_pid(n)) for n in fleet.lab.nodes} == before  # nobody touched
    finally:
        node.sh(f"pkill -P {holder}; kill {holder}; true")  # flock and the sleep that holds its fd
        node.sh(f"flock -w 10 {PREFIX}/.lock true")


@contextmanager
def http_origin(root: Path, host: str) -> Iterator[str]:
    """``rclone serve http`` over ``root`` on ``host`` (the lab's gateway): a plain web server."""
    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    port = free_port()
    proc = subprocess.Popen([rclone, "serve", "http", "--addr", f"{host}:{port}", "--config", "/dev/null", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(port, host), 30, "rclone serve http", proc)
        yield f"http://{host}:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_nodes_fetch_a_signed_model_over_plain_http_with_the_inventory_trust_key(fleet: Fleet, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    fetch(build_request("weightship-tiny"), origin / "tiny")
    assert run_cli("manifest", "keygen", tmp_path / "acme.pem").code == 0
    assert run_cli("manifest", "sign", origin / "tiny", "--key", tmp_path / "acme.pem").code == 0
    signed = fleet.inventory.with_name("signed.yaml")
    doc = yaml.safe_load(fleet.inventory.read_text())
    doc["fetch"] = {"trust_keys": [str(tmp_path / "acme.pem.pub")]}
    signed.write_text(yaml.safe_dump(doc))
    shutil.copytree(origin / "tiny", origin / "unsigned")
    (origin / "unsigned/.weightship/manifest.sig").unlink()
    with http_origin(origin, fleet.lab.gateway) as url:
        r = run_cli("--json", "deploy", "nodes", f"{url}/tiny/", "-i", signed, "--name", NAME, "--gpus", "0",
                    "--api-key-file", fleet.keys, "--max-unavailable", "4", "--yes", timeout=900)
        assert r.code == 0, r.stderr
        assert {row["state"] for row in rows(r).values()} == {"updated"}
        unsigned = fleet.inventory.with_name("unsigned.yaml")
        doc["fetch"] = {}
        unsigned.write_text(yaml.safe_dump(doc))
        r = run_cli("--json", "deploy", "nodes", f"{url}/unsigned/", "-i", unsigned, "--name", "unsigned", "--port",
                    "8001", "--gpus", "0", "--api-key-file", fleet.keys, "--yes", timeout=900)
    assert_clean_failure(r, code=1)  # the same bytes, but no key vouches for them over plain http
    assert {row["state"] for row in rows(r).values()} == {"failed"}
    for node in fleet.lab.nodes:
        assert chat(node)
        assert node.sh(f"ls {PREFIX}/apps").split() == [NAME]


def test_logs_rollback_and_uninstall(fleet: Fleet) -> None:
    nodes = fleet.lab.nodes
    r = run_cli("nodes", "logs", "-i", fleet.inventory, "--name", NAME, "--hosts", "node1", "-n", "30")
    assert r.code == 0 and "Uvicorn running" in r.stdout, r.stdout

    # Each node goes back to its own previous release (node3 and node4 never had the one node1
    # and node2 took while node3 was cut off).
    previous = {n.name: json.loads(n.sh(f"cat {PREFIX}/apps/{NAME}/history.json"))[-2] for n in nodes}
    r = run_cli("--json", "nodes", "rollback", "-i", fleet.inventory, "--name", NAME, "--max-unavailable", "2")
    assert r.code == 0, r.stderr
    assert {row["state"] for row in rows(r).values()} == {"updated"}
    for node in nodes:
        assert current(node) == previous[node.name]
        assert chat(node)

    model = nodes[0].sh(f"readlink {PREFIX}/apps/{NAME}/current/model").strip()
    r = run_cli("nodes", "uninstall", "-i", fleet.inventory, "--name", NAME)
    assert_clean_failure(r, code=2)  # asks first
    r = run_cli("nodes", "uninstall", "-i", fleet.inventory, "--name", NAME, "--yes")
    assert r.code == 0, r.stderr
    for node in nodes:
        assert node.sh(f"ls /etc/systemd/system | grep weightship-{NAME} || true").strip() == ""
        assert node.sh(f"ls {PREFIX}/apps").strip() == ""
        assert node.sh(f"id weightship-{NAME} 2>&1 || true").find("no such user") >= 0
        assert node.sh(f"test -f {model}/.weightship/manifest.json && echo kept").strip() == "kept"
