"""The chart's network isolation and the seeders' placement, as a cluster would apply them: the
rendered NetworkPolicies (on by default) evaluated against the rendered pods' own labels and
ports, and the rendered pod specs scheduled against typical nodes (see ``netpol.py``)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from k8s_helpers import CHART
from netpol import Endpoint, admits, node, nodes_for, pod_of, pod_spec

from weightship.deploy.k8s import helm as engine
from weightship.deploy.k8s.deployer import check_objects, plan
from weightship.errors import InvalidValuesError

Obj = dict[str, Any]
NS = "ml"

DNS = Endpoint("10.244.0.53", "kube-system", {"k8s-app": "kube-dns"})
HUB = Endpoint("18.164.174.55")  # a public address, as huggingface.co's are
HUB_V6 = Endpoint("2600:9000:2001::1")
METADATA = Endpoint("169.254.169.254")  # the cloud instance metadata service
METADATA_V6 = Endpoint("fd00:ec2::254")
API_SERVER = Endpoint("10.0.0.2")
LAN = Endpoint("192.168.10.10")
OTHER_POD = Endpoint("10.244.5.5", "other", {"app": "db"})
SAME_NS_POD = Endpoint("10.244.5.6", NS, {"app": "something-else"})


class Release:
    """A rendered release and the pods it would run."""

    def __init__(self, values: Obj) -> None:
        self.rendered = engine.render(CHART, values, release="demo", namespace=NS)
        every = self.rendered.objects + self.rendered.hooks
        self.policies = [o for o in every if o["kind"] == "NetworkPolicy"]
        self.service = next(o for o in every if o["kind"] == "Service"
                            and o["metadata"]["name"] == "demo-weightship")
        owner = next(o for o in every if o["kind"] in ("Deployment", "StatefulSet"))
        self.server = pod_of(owner, "10.244.1.10", NS)
        (test_pod,) = [o for o in self.rendered.hooks if o["kind"] == "Pod"]
        self.test = pod_of(test_pod, "10.244.9.9", NS)
        peers = [o for o in every if o["kind"] == "DaemonSet"]
        self.peer = pod_of(peers[0], "10.244.2.20", NS) if peers else None
        self.values = engine.effective_values(CHART, values)

    def admits(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP",
               namespaces: dict[str, dict[str, str]] | None = None) -> bool:
        return admits(self.policies, src, dst, port, protocol, namespaces)

    def api_port(self) -> int:
        """The server pod's port behind the Service's API port (what policies see)."""
        (port,) = self.service["spec"]["ports"]
        target = port["targetPort"]
        assert all(self.server.labels.get(k) == v for k, v in self.service["spec"]["selector"].items())
        return self.server.ports[target] if isinstance(target, str) else int(target)


# ---- item 13: on by default, egress to DNS and the sources only -------------------------------


def test_network_policy_is_on_by_default_for_every_pod_of_the_release() -> None:
    r = Release({})
    assert r.values["networkPolicy"]["enabled"] is True
    assert r.policies, "no NetworkPolicy in a default install"
    for pod in (r.server, r.test):
        selecting = [p for p in r.policies if all(
            pod.labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())]
        assert {t for p in selecting for t in p["spec"]["policyTypes"]} == {"Ingress", "Egress"}
    problems, _, _ = check_objects(r.rendered.objects + r.rendered.hooks, r.values)
    assert problems == []
    assert "egress is limited to DNS and the model's sources\n(TCP 443 to public addresses)" in \
        r.rendered.notes


EGRESS = [  # (destination, port, protocol, admitted by default)
    (DNS, 53, "UDP", True), (DNS, 53, "TCP", True),
    (HUB, 443, "TCP", True), (HUB_V6, 443, "TCP", True),
    (HUB, 80, "TCP", False), (HUB, 22, "TCP", False),
    (METADATA, 80, "TCP", False), (METADATA, 443, "TCP", False), (METADATA_V6, 80, "TCP", False),
    (API_SERVER, 443, "TCP", False), (API_SERVER, 6443, "TCP", False),
    (LAN, 443, "TCP", False), (OTHER_POD, 443, "TCP", False), (SAME_NS_POD, 443, "TCP", False),
    (Endpoint("100.64.1.1"), 443, "TCP", False), (Endpoint("127.0.0.1"), 443, "TCP", False),
    (Endpoint("172.20.0.1"), 443, "TCP", False), (Endpoint("::ffff:10.0.0.2"), 443, "TCP", False),
    (OTHER_POD, 53, "UDP", False),  # DNS is kube-system's, not any pod's
    # IPv6 ranges that lead to IPv4 addresses: NAT64 (well-known and local-use) and 6to4
    (Endpoint("64:ff9b::a00:2"), 443, "TCP", False), (Endpoint("64:ff9b::a9fe:a9fe"), 80, "TCP", False),
    (Endpoint("64:ff9b:1::a00:2"), 443, "TCP", False), (Endpoint("2002:a00:2::1"), 443, "TCP", False),
]


@pytest.mark.parametrize(("dst", "port", "protocol", "admitted"), EGRESS,
                         ids=[f"{d.ip}:{p}/{proto}" for d, p, proto, _ in EGRESS])
def test_default_egress_reaches_dns_and_the_public_hub_only(dst: Endpoint, port: int,
                                                            protocol: str, admitted: bool) -> None:
    r = Release({})
    assert r.admits(r.server, dst, port, protocol) is admitted


def test_sources_narrow_to_cidrs_and_widen_only_when_asked() -> None:
    mirror = Endpoint("203.0.113.7")
    narrow = Release({"networkPolicy": {"egress": {"publicSources": False,
                                                   "sourceCIDRs": ["203.0.113.0/24"]}}})
    assert narrow.admits(narrow.server, mirror, 443)
    assert not narrow.admits(narrow.server, HUB, 443)
    assert not narrow.admits(narrow.server, mirror, 80)
    in_cluster = Endpoint("10.96.3.4")
    assert not Release({}).admits(Release({}).server, in_cluster, 443)
    wide = Release({"networkPolicy": {"egress": {"sourceCIDRs": ["0.0.0.0/0"],
                                                 "sourcePorts": [443, 9000]}}})
    assert wide.admits(wide.server, in_cluster, 9000) and wide.admits(wide.server, HUB, 443)
    with pytest.raises(InvalidValuesError) as info:  # a fetch that could reach no source
        Release({"networkPolicy": {"egress": {"publicSources": False}}})
    assert any("leaves the fetch no source to reach" in m for m in info.value.problems)
    extra = Release({"networkPolicy": {"egress": {"publicSources": False, "extraRules": [{
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "hub"}},
                "podSelector": {"matchLabels": {"app": "weightship-mirror"}}}],
        "ports": [{"port": 8080, "protocol": "TCP"}]}]}}})
    hub_mirror = Endpoint("10.244.7.7", "hub", {"app": "weightship-mirror"})
    assert extra.admits(extra.server, hub_mirror, 8080)
    assert not extra.admits(extra.server, OTHER_POD, 8080)
    open_egress = Release({"networkPolicy": {"egress": {"restrict": False}}})
    assert open_egress.admits(open_egress.server, LAN, 22)


def test_cluster_cidrs_that_are_public_addresses_are_left_out() -> None:
    """networkPolicy.clusterCIDRs: a cluster whose pods or nodes have public addresses keeps
    them closed to the fetch, in both families; the rest of the internet stays open."""
    pods, pods_v6 = Endpoint("198.51.100.7"), Endpoint("2001:db8:42::7")
    assert Release({}).admits(Release({}).server, pods, 443)
    r = Release({"networkPolicy": {"clusterCIDRs": ["198.51.100.0/24", "2001:db8:42::/56"]}})
    assert not r.admits(r.server, pods, 443) and not r.admits(r.server, pods_v6, 443)
    assert r.admits(r.server, HUB, 443) and r.admits(r.server, HUB_V6, 443)
    assert not r.admits(r.server, METADATA, 80)  # publicExcept still applies
    problems, _, _ = check_objects(r.rendered.objects + r.rendered.hooks, r.values)
    assert problems == []


@pytest.mark.parametrize("values", [
    {}, {"p2p": {"enabled": True}},
    {"networkPolicy": {"clusterCIDRs": ["203.0.113.0/24", "10.0.0.0/8", "2001:db8::/32"]}},
    {"networkPolicy": {"egress": {"sourceCIDRs": ["0.0.0.0/0", "::/0", "10.1.0.0/16"]}}},
    {"networkPolicy": {"egress": {"publicSources": False, "sourceCIDRs": ["2001:db8::/32"]}}},
], ids=["defaults", "p2p", "cluster-cidrs", "wide", "v6-only"])
def test_ip_blocks_are_what_the_api_server_accepts(values: Obj) -> None:
    """kubernetes-validate checks the schema only; the API server also requires each except to
    lie strictly inside its cidr (same family)."""
    r = Release(values)
    problems, _, _ = check_objects(r.rendered.objects + r.rendered.hooks, r.values)
    assert problems == []
    blocks = [peer["ipBlock"] for p in r.policies for rule in p["spec"].get("egress") or []
              for peer in rule.get("to") or [] if "ipBlock" in peer]
    assert blocks
    for block in blocks:
        cidr = ipaddress.ip_network(block["cidr"])
        for x in block.get("except") or []:
            inner = ipaddress.ip_network(x)
            assert inner.version == cidr.version and inner.subnet_of(cidr) and inner != cidr, block  # type: ignore[arg-type]


def test_api_port_admits_allowed_from_and_nothing_else_on_other_ports() -> None:
    r = Release({})
    port = r.api_port()
    assert r.admits(OTHER_POD, r.server, port)  # allowedFrom [] = anyone, on the API port
    assert not r.admits(OTHER_POD, r.server, port + 1)
    locked = Release({"networkPolicy": {"allowedFrom": [
        {"namespaceSelector": {"matchLabels": {"team": "apps"}}}]}})
    app = Endpoint("10.244.6.6", "apps", {"app": "chat"})
    assert locked.admits(app, locked.server, port, namespaces={"apps": {"team": "apps"}})
    assert not locked.admits(OTHER_POD, locked.server, port)


def test_p2p_port_is_open_only_between_the_release_pods() -> None:
    r = Release({"p2p": {"enabled": True}})
    assert r.peer is not None
    port = r.values["p2p"]["port"]
    assert r.admits(r.server, r.peer, port) and r.admits(r.peer, r.peer, port)
    assert not r.admits(OTHER_POD, r.peer, port) and not r.admits(SAME_NS_POD, r.peer, port)
    assert not r.admits(r.test, r.peer, port)
    assert r.admits(r.peer, HUB, 443) and r.admits(r.peer, DNS, 53, "UDP")  # seeders fetch too
    assert not r.admits(r.peer, METADATA, 80) and not r.admits(r.peer, OTHER_POD, port)


# ---- item 19: the `helm test` pod passes under the policy -------------------------------------

TEST_POD_CASES = [
    ("defaults", {}),
    ("allowed-from-one-namespace", {"networkPolicy": {"enabled": True, "allowedFrom": [
        {"namespaceSelector": {"matchLabels": {"team": "apps"}}}]}}),
    ("p2p-stateful", {"p2p": {"enabled": True}, "storage": {"mode": "perPodPVC"}}),
    ("own-service-port", {"service": {"port": 8080}, "serve": {"port": 9000},
                          "networkPolicy": {"allowedFrom": [{"podSelector": {}}]}}),
]


@pytest.mark.parametrize(("case", "values"), TEST_POD_CASES, ids=[c for c, _ in TEST_POD_CASES])
def test_the_helm_test_pod_reaches_the_service_under_the_policy(case: str, values: Obj) -> None:
    r = Release(values)
    script = pod_spec(r.rendered.hooks[0])["containers"][0]["args"][0]
    svc_port = r.service["spec"]["ports"][0]["port"]
    assert f"http://demo-weightship:{svc_port}/v1/models" in script
    assert r.admits(r.test, DNS, 53, "UDP")  # resolves the Service's name
    assert r.admits(r.test, r.server, r.api_port())  # and reaches a pod behind it
    # ... and nothing else: the test pod fetches nothing and accepts nothing
    assert not r.admits(r.test, HUB, 443) and not r.admits(r.test, OTHER_POD, r.api_port())
    assert not r.admits(OTHER_POD, r.test, 8000)


# ---- item 18: the seeders run where the model's pods run ---------------------------------------

GPU_TAINT = [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
GFD = {"nvidia.com/gpu.count": "1", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
NODES = [
    node("a100", {**GFD, "nvidia.com/gpu.memory": "81920", "pool": "llm"}, GPU_TAINT,
         {"nvidia.com/gpu": "1"}),
    node("t4", {**GFD, "nvidia.com/gpu.memory": "15360", "pool": "llm"}, GPU_TAINT,
         {"nvidia.com/gpu": "1"}),
    node("a100-other-pool", {**GFD, "nvidia.com/gpu.memory": "81920", "pool": "batch"},
         GPU_TAINT, {"nvidia.com/gpu": "1"}),
    node("cpu"),
    node("cpu-dedicated", {"pool": "llm"}, [{"key": "dedicated", "value": "llm",
                                             "effect": "NoSchedule"}]),
]


def _placement(values: Obj) -> tuple[set[str], set[str], Obj, Obj]:
    r = engine.render(CHART, {"p2p": {"enabled": True}, **values}, release="demo", namespace=NS)
    server = next(o for o in r.objects if o["kind"] in ("Deployment", "StatefulSet"))
    peers = next(o for o in r.objects if o["kind"] == "DaemonSet")
    return (nodes_for(pod_spec(server), NODES), nodes_for(pod_spec(peers), NODES),
            pod_spec(server), pod_spec(peers))


PLACEMENT = [
    ("defaults", {}, {"a100", "t4", "a100-other-pool"}),
    ("gpu-memory", {"gpu": {"minMemoryMiB": 24410}}, {"a100", "a100-other-pool"}),
    ("selector-affinity-tolerations", {
        "gpu": {"minMemoryMiB": 24410, "runtimeClassName": "nvidia"},
        "nodeSelector": {"pool": "llm"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                         "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "nvidia.com/gpu.product", "operator": "In",
                     "values": ["NVIDIA-A100-SXM4-80GB"]}]}]}},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 10, "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "server"}}}}]}}},
     {"a100"}),
]


@pytest.mark.parametrize(("case", "values", "where"), PLACEMENT, ids=[c for c, _, _ in PLACEMENT])
def test_seeders_run_only_where_the_serving_pods_can(case: str, values: Obj,
                                                     where: set[str]) -> None:
    servers, peers, server_spec, peer_spec = _placement(values)
    assert servers == where
    assert peers == servers, "the P2P DaemonSet must land where the model's pods can, no more"
    assert peer_spec.get("runtimeClassName") == server_spec.get("runtimeClassName")
    assert peer_spec.get("nodeSelector") == server_spec.get("nodeSelector")
    assert "podAntiAffinity" not in (peer_spec.get("affinity") or {})  # the servers' spreading


def test_seeders_can_be_widened_past_the_workload() -> None:
    servers, peers, _, peer_spec = _placement({"p2p": {"enabled": True, "followWorkload": False},
                                               "gpu": {"runtimeClassName": "nvidia"}})
    assert peers == {"a100", "t4", "a100-other-pool", "cpu"} and peers > servers
    assert "runtimeClassName" not in peer_spec  # a CPU node has no nvidia runtime
    _, peers, _, _ = _placement({"p2p": {
        "enabled": True, "followWorkload": False, "nodeSelector": {"pool": "llm"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}]}})
    assert peers == {"a100", "t4", "cpu-dedicated"}
    _, peers, _, _ = _placement({"p2p": {"enabled": True, "gpuNodeLabel": ""}})
    assert "cpu" in peers  # no GPU label to require: every node that admits the seeders


def test_seeder_placement_values_that_would_be_ignored_are_refused() -> None:
    with pytest.raises(InvalidValuesError) as info:
        engine.render(CHART, {"p2p": {"enabled": True, "nodeSelector": {"pool": "llm"}}},
                      release="demo", namespace=NS)
    assert any("p2p.nodeSelector" in p and "p2p.followWorkload=false" in p
               for p in info.value.problems), info.value.problems


def test_deploy_plan_passes_its_checks_with_the_default_policy_and_placement() -> None:
    """What ``weightship deploy k8s --dry-run`` runs: schema, Pod Security and credential checks
    (a problem raises RenderedObjectsRejectedError)."""
    for sets in ([], ["p2p.enabled=true"]):
        p = plan("mistral-7b-v0.1", release="demo", namespace=NS, sets=sets)
        names = {o["metadata"]["name"] for o in p.rendered.objects if o["kind"] == "NetworkPolicy"}
        assert names == {"demo-weightship", "demo-weightship-test"} | (
            {"demo-weightship-peer"} if sets else set())


def test_the_evaluator_follows_the_documented_semantics() -> None:
    """The evaluator's own check, on the examples of the Kubernetes documentation: without it
    every assertion above could pass for the wrong reason."""
    db = Endpoint("10.244.8.8", "prod", {"role": "db"}, {"pg": 5432})
    frontend = Endpoint("10.244.8.9", "prod", {"role": "frontend"})
    elsewhere = Endpoint("10.244.8.10", "dev", {"role": "frontend"})
    assert admits([], elsewhere, db, 5432)  # no policy: open
    deny = {"metadata": {"namespace": "prod"}, "spec": {"podSelector": {},
                                                        "policyTypes": ["Ingress"]}}
    assert not admits([deny], frontend, db, 5432) and admits([deny], db, HUB, 443)

    def allow(*peers: Obj) -> Obj:
        return {"metadata": {"namespace": "prod"}, "spec": {
            "podSelector": {"matchLabels": {"role": "db"}},
            "ingress": [{"from": list(peers), "ports": [{"port": "pg"}]}]}}

    both = allow({"namespaceSelector": {"matchLabels": {"env": "prod"}},
                  "podSelector": {"matchLabels": {"role": "frontend"}}})  # one peer: AND
    either = allow({"namespaceSelector": {"matchLabels": {"env": "prod"}}},
                   {"podSelector": {"matchLabels": {"role": "frontend"}}})  # two peers: OR
    ns = {"prod": {"env": "prod"}, "dev": {"env": "dev"}}
    assert admits([both], frontend, db, 5432, namespaces=ns)
    assert not admits([both], elsewhere, db, 5432, namespaces=ns)
    assert not admits([both], frontend, db, 5433, namespaces=ns)  # the named port is 5432
    assert admits([either], Endpoint("10.244.8.11", "prod", {"role": "batch"}), db, 5432,
                  namespaces=ns)
    assert not admits([either], elsewhere, db, 5432, namespaces=ns)  # podSelector: own ns only
    block = allow({"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}})
    assert admits([block], Endpoint("172.17.0.5"), db, 5432)
    assert not admits([block], Endpoint("172.17.1.5"), db, 5432)
    assert not admits([deny, block], Endpoint("172.17.1.5"), db, 5432)  # policies add up
    assert admits([deny, block], Endpoint("172.17.2.5"), db, 5432)
