"""What a cluster would do with the chart's objects, without a cluster: which connections its
NetworkPolicies admit, and which nodes a pod can be scheduled on.

A small evaluator of the documented semantics (no network plugin runs here):

- NetworkPolicy (networking.k8s.io/v1): a pod selected by no policy of a direction is open in
  that direction; a selected pod admits a connection when any rule of any selecting policy
  matches both the port (number or named container port of the destination, protocol,
  ``endPort``) and the peer (``podSelector`` / ``namespaceSelector`` / both, or an ``ipBlock``
  with its ``except``). A connection needs the source's egress and the destination's ingress.
  Policies see the pod behind a Service (its IP and container port), not the Service's own.
- Scheduling: ``nodeSelector``, required node affinity (In, NotIn, Exists, DoesNotExist, Gt,
  Lt), NoSchedule/NoExecute taints against tolerations, and extended resources (GPUs) against
  the node's allocatable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (namespace and labels) or an address outside the cluster
    (namespace None). ``ports`` are a pod's named container ports."""

    ip: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)


def pod_spec(owner: Obj) -> Obj:
    """The pod spec of a workload or of a bare Pod."""
    return owner["spec"] if owner["kind"] == "Pod" else owner["spec"]["template"]["spec"]


def pod_labels(owner: Obj) -> dict[str, str]:
    meta = owner["metadata"] if owner["kind"] == "Pod" else owner["spec"]["template"]["metadata"]
    return dict(meta.get("labels") or {})


def pod_of(owner: Obj, ip: str, namespace: str) -> Endpoint:
    """The pod a workload (or a bare Pod) would run, at ``ip``."""
    spec = pod_spec(owner)
    ports = {p["name"]: p["containerPort"] for c in spec["containers"]
             for p in c.get("ports") or [] if "name" in p}
    return Endpoint(ip, namespace, pod_labels(owner), ports)


def selects(selector: Obj | None, labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels`` (an empty selector matches everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        have, values = labels.get(e["key"]), e.get("values") or []
        ok = {"In": have in values, "NotIn": have not in values, "Exists": have is not None,
              "DoesNotExist": have is None}[e["operator"]]
        if not ok:
            return False
    return True


def _types(policy: Obj) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _port_matches(ports: list[Obj] | None, port: int, protocol: str, dest: Endpoint) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        named = p["port"]
        if isinstance(named, str) and named not in dest.ports:
            continue
        first = dest.ports[named] if isinstance(named, str) else int(named)
        if first <= port <= int(p.get("endPort", first)):
            return True
    return False


def _peer_matches(peer: Obj, other: Endpoint, policy_ns: str,
                  namespaces: Mapping[str, Mapping[str, str]]) -> bool:
    if "ipBlock" in peer:
        block, addr = peer["ipBlock"], ipaddress.ip_address(other.ip)
        net = ipaddress.ip_network(block["cidr"])
        return (addr.version == net.version and addr in net and not any(
            addr in ipaddress.ip_network(x) for x in block.get("except") or []))
    if other.namespace is None:
        return False  # selectors only ever match pods
    ns_selector = peer.get("namespaceSelector")
    ns_ok = (other.namespace == policy_ns if ns_selector is None
             else selects(ns_selector, namespaces[other.namespace]))
    return ns_ok and ("podSelector" not in peer or selects(peer["podSelector"], other.labels))


def _side_admits(pod: Endpoint, other: Endpoint, dest: Endpoint, port: int, protocol: str,
                 policies: Iterable[Obj], direction: str,
                 namespaces: Mapping[str, Mapping[str, str]]) -> bool:
    if pod.namespace is None:
        return True  # outside the cluster: no policy applies
    selecting = [p for p in policies if p["metadata"].get("namespace") == pod.namespace
                 and selects(p["spec"].get("podSelector"), pod.labels)
                 and direction in _types(p)]
    if not selecting:
        return True
    rules, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for policy in selecting:
        for rule in policy["spec"].get(rules) or []:
            peers = rule.get(peers_key)
            if _port_matches(rule.get("ports"), port, protocol, dest) and (
                    not peers or any(_peer_matches(x, other, pod.namespace, namespaces)
                                     for x in peers)):
                return True
    return False


def admits(policies: Iterable[Obj], src: Endpoint, dst: Endpoint, port: int,
           protocol: str = "TCP", namespaces: Mapping[str, Mapping[str, str]] | None = None) -> bool:
    """Whether ``src`` may open a connection to ``dst`` on ``port``."""
    policies = list(policies)
    ns_labels = {name: {"kubernetes.io/metadata.name": name, **labels}
                 for name, labels in (namespaces or {}).items()}
    for e in (src, dst):
        if e.namespace is not None:
            ns_labels.setdefault(e.namespace, {"kubernetes.io/metadata.name": e.namespace})
    return (_side_admits(src, dst, dst, port, protocol, policies, "Egress", ns_labels)
            and _side_admits(dst, src, dst, port, protocol, policies, "Ingress", ns_labels))


# ---- scheduling --------------------------------------------------------------------------------


def node(name: str, labels: Mapping[str, str] | None = None, taints: list[Obj] | None = None,
         allocatable: Mapping[str, str] | None = None) -> Obj:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {"taints": taints or []},
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", **(allocatable or {})}}}


def _expression_holds(e: Obj, labels: Mapping[str, str]) -> bool:
    have, values = labels.get(e["key"]), e.get("values") or []
    if e["operator"] in ("Gt", "Lt"):
        if have is None or not have.lstrip("-").isdigit():
            return False
        return int(have) > int(values[0]) if e["operator"] == "Gt" else int(have) < int(values[0])
    return selects({"matchExpressions": [e]}, labels)


def _tolerates(tolerations: list[Obj], taint: Obj) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint["effect"]:
            continue
        if t.get("operator", "Equal") == "Exists":
            if not t.get("key") or t["key"] == taint["key"]:
                return True
        elif t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _requests(spec: Obj, resource: str) -> int:
    total = 0
    for c in spec["containers"]:
        r = c.get("resources") or {}
        total += int((r.get("limits") or {}).get(resource, (r.get("requests") or {}).get(resource, 0)))
    return total


def schedulable(spec: Obj, n: Obj, extended: Iterable[str] = ("nvidia.com/gpu",)) -> bool:
    """Whether a pod with ``spec`` can be placed on node ``n``."""
    labels = n["metadata"].get("labels") or {}
    if any(labels.get(k) != str(v) for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required and not any(all(_expression_holds(e, labels) for e in term.get("matchExpressions") or [])
                            for term in required["nodeSelectorTerms"]):
        return False
    for taint in n["spec"].get("taints") or []:
        if taint["effect"] in ("NoSchedule", "NoExecute") and not _tolerates(
                spec.get("tolerations") or [], taint):
            return False
    allocatable = n["status"]["allocatable"]
    return all(_requests(spec, r) <= int(allocatable.get(r, 0)) for r in extended)


def nodes_for(spec: Obj, nodes: Iterable[Obj]) -> set[str]:
    """The names of the nodes a pod with ``spec`` can run on."""
    return {n["metadata"]["name"] for n in nodes if schedulable(spec, n)}
