"""Dedicated instances on a company's own servers (``weightship instance --on nodes``), on two
real nodes: each company its own host, its own keys (each endpoint refuses the other's), its own
usage; a host is never given to two instances. The tests run in order on one lab."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from nodelab import Lab, Node

from tests.conftest import Result, assert_clean_failure, run_cli

PREFIX = "/opt/weightship"


@dataclass
class Site:
    lab: Lab
    inventory: Path

    def instance(self, *args: str | Path) -> Result:
        return run_cli("--json", "instance", *args, "-i", self.inventory, timeout=900)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Site]:
    with Lab(2, tmp_path_factory.mktemp("lab2")) as lab:
        work = tmp_path_factory.mktemp("operator")
        yield Site(lab, lab.inventory(work / "nodes.yaml", runtime={"wheelhouse": str(wheelhouse)}))


def chat(node: Node, key: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"http://{node.address}:8000/v1", api_key=key, max_retries=0, timeout=60)
    return client.chat.completions.create(model="weightship-tiny", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "Hello"}])


def refused(node: Node, key: str) -> bool:
    """Whether ``node`` refuses ``key`` (asked on /v1/models, which is not metered)."""
    client = openai.OpenAI(base_url=f"http://{node.address}:8000/v1", api_key=key, max_retries=0, timeout=60)
    try:
        client.models.list()
    except openai.AuthenticationError:
        return True
    return False


def test_two_companies_each_get_their_own_host(site: Site) -> None:
    for name, host in (("acme", "node1"), ("globex", "node2")):
        r = site.instance("create", name, "--model", "weightship-tiny", "--on", "nodes", "--hosts", host,
                          "--gpus", "0", "--yes")
        assert r.code == 0, r.stderr
        info = json.loads(r.stdout)
        assert (info["name"], info["target"], info["replicas"], info["ready"], info["paused"]) == (name, "nodes", 1, 1,
                                                                                                   False)
    r = site.instance("list")
    assert r.code == 0, r.stderr
    listed = {i["name"]: i for i in json.loads(r.stdout)}
    assert sorted(listed) == ["acme", "globex"]
    assert listed["acme"]["endpoint"] == [f"http://{site.lab.nodes[0].address}:8000"]


def test_a_host_is_never_given_to_two_instances(site: Site) -> None:
    node1 = site.lab.nodes[0]
    before = node1.sh(f"ls {PREFIX}/apps; systemctl show -p MainPID --value weightship-acme.service")
    r = site.instance("create", "initech", "--model", "weightship-tiny", "--on", "nodes", "--hosts", "node1",
                      "--gpus", "0", "--yes")
    assert_clean_failure(r, code=1)
    assert "node1 already serves acme" in r.stderr
    assert node1.sh(f"ls {PREFIX}/apps; systemctl show -p MainPID --value weightship-acme.service") == before
    r = site.instance("create", "acme", "--model", "weightship-tiny", "--on", "nodes", "--hosts", "node2",
                      "--gpus", "0", "--yes")
    assert_clean_failure(r, code=1)  # the name is taken too


def test_each_endpoint_refuses_the_other_companys_key_and_counts_usage_per_key(site: Site) -> None:
    node1, node2 = site.lab.nodes
    keys = {}
    for name in ("acme", "globex"):
        r = site.instance("keys", "add", name, "--key-name", "ci")
        assert r.code == 0, r.stderr
        keys[name] = json.loads(r.stdout)["key"]
        assert len(keys[name]) >= 32
    for node, own, other in ((node1, "acme", "globex"), (node2, "globex", "acme")):
        assert not refused(node, keys[own])  # `keys add` returned once the server had loaded it; no restart
        assert refused(node, keys[other])
        stored = node.sh(f"cat {PREFIX}/apps/{own}/keys.json")
        assert keys[own] not in stored and keys[other] not in stored

    told = [chat(node1, keys["acme"]).usage for _ in range(3)]
    r = site.instance("usage", "acme", "--by", "key")
    assert r.code == 0, r.stderr
    by_key = {row["key_name"]: row for row in json.loads(r.stdout)}
    assert set(by_key) == {"ci"}  # the operator's own gate requests are not the company's usage
    ci = by_key["ci"]
    assert (ci["requests"], ci["errors"]) == (3, 0)
    assert ci["prompt_tokens"] == sum(u.prompt_tokens for u in told if u)
    assert ci["completion_tokens"] == sum(u.completion_tokens for u in told if u)

    r = site.instance("keys", "revoke", "acme", "ci")
    assert r.code == 0, r.stderr
    assert refused(node1, keys["acme"])  # revoke returns once the server refuses it (within 10 s)


def test_pause_stops_serving_and_resume_does_not_fetch_again(site: Site) -> None:
    node1 = site.lab.nodes[0]
    model = node1.sh(f"readlink {PREFIX}/apps/acme/current/model").strip()
    inode = node1.sh(f"stat -c %i {model}/model.safetensors")
    r = site.instance("pause", "acme")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["paused"] is True
    assert node1.sh("systemctl is-active weightship-acme.service || true").strip() == "inactive"
    r = site.instance("resume", "acme")
    assert r.code == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["paused"], info["ready"]) == (False, 1)
    assert node1.sh(f"stat -c %i {model}/model.safetensors") == inode


def test_delete_leaves_nothing_of_the_instance(site: Site) -> None:
    node2 = site.lab.nodes[1]
    r = run_cli("instance", "delete", "globex", "-i", site.inventory)
    assert_clean_failure(r, code=2)  # asks first, and there is no terminal
    assert node2.sh(f"ls {PREFIX}/apps").split() == ["globex"]
    r = site.instance("delete", "globex", "--yes")
    assert r.code == 0, r.stderr
    assert node2.sh(f"ls -A {PREFIX}/apps {PREFIX}/models; ls /etc/systemd/system | grep weightship || true; "
                    "ls /var/lib/weightship 2>/dev/null || true").split() == [f"{PREFIX}/apps:", f"{PREFIX}/models:"]
    r = site.instance("list")
    assert [i["name"] for i in json.loads(r.stdout)] == ["acme"]
    r = site.instance("show", "globex")
    assert_clean_failure(r, code=1)
    r = site.instance("show", "Not_A_Label")
    assert_clean_failure(r, code=2)
