"""The objects an instance owns on Kubernetes besides its Helm release, and the chart values it
holds whatever the user sets. Pure functions: no cluster.

An instance ``NAME`` owns:

- the namespace ``wsi-NAME`` (labels: managed by weightship, the instance's name, the
  "restricted" Pod Security Standard enforced; annotations: what it was created with);
- a LimitRange (defaults for containers that state no resources) and a ResourceQuota summed
  from the rendered release (GPUs, CPU, memory, pods, claims, storage; no LoadBalancer or
  NodePort Service);
- a default-deny NetworkPolicy: the chart's own policies then admit only the API port from the
  ingress controller's namespace (and the API server's addresses, which reach
  ``/v1/usage`` through the pod proxy), DNS, and egress to the model's sources;
- the Secret ``weightship-api-keys`` (the hashed key file: no key in it) and the Secret
  ``weightship-operator`` (the plain key of scope "usage" that ``instance usage`` reads with);
- one Helm release of the chart, named ``NAME``, its objects named ``weightship``, its pods
  bound to the nodes tainted ``weightship.io/dedicated=NAME:NoSchedule`` (nodeSelector on the
  label ``weightship.io/dedicated=NAME``, which ``create`` puts on those nodes).
"""

from __future__ import annotations

import ipaddress
import math
import re
from fractions import Fraction
from typing import Any

from weightship.deploy.k8s.policy import pod_spec
from weightship.errors import UsageError

Obj = dict[str, Any]

MANAGED_BY = {"app.kubernetes.io/managed-by": "weightship"}
INSTANCE = "weightship.io/instance"
DEDICATED = "weightship.io/dedicated"
ANNOTATION = "weightship.io/"  # prefix of the namespace's annotations (see InstanceRecord)
KEYS_SECRET, KEYS_FILE = "weightship-api-keys", "keys.json"
OPERATOR_SECRET, OPERATOR_FILE = "weightship-operator", "usage-key"
FULLNAME = "weightship"  # the release's object names; the namespace names the instance
PSS = "restricted"
# What a container that states nothing gets (the chart states everything; an extra container
# added by the cluster, such as a sidecar injector's, might not).
CONTAINER_DEFAULTS = {"defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                      "default": {"memory": "256Mi"}}


def namespace_of(name: str) -> str:
    return f"wsi-{name}"


def labels(name: str) -> dict[str, str]:
    return {**MANAGED_BY, INSTANCE: name}


def _meta(name: str, object_name: str, namespace: str | None = None) -> Obj:
    meta: Obj = {"name": object_name, "labels": labels(name)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def namespace(name: str, annotations: dict[str, str]) -> Obj:
    meta = _meta(name, namespace_of(name))
    meta["labels"].update({f"pod-security.kubernetes.io/{mode}": PSS
                           for mode in ("enforce", "audit", "warn")})
    meta["labels"]["pod-security.kubernetes.io/enforce-version"] = "latest"
    meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def limit_range(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "LimitRange",
            "metadata": _meta(name, "weightship-defaults", namespace_of(name)),
            "spec": {"limits": [{"type": "Container", **CONTAINER_DEFAULTS}]}}


def default_deny(name: str) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(name, "weightship-default-deny", namespace_of(name)),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}


def keys_secret(name: str, key_file_text: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(name, KEYS_SECRET, namespace_of(name)),
            "stringData": {KEYS_FILE: key_file_text}}


def operator_secret(name: str, key: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(name, OPERATOR_SECRET, namespace_of(name)),
            "stringData": {OPERATOR_FILE: key}}


def toleration(name: str) -> Obj:
    return {"key": DEDICATED, "operator": "Equal", "value": name, "effect": "NoSchedule"}


_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def check_peers(allow_from: list[str], admin_from: list[str]) -> None:
    """Refuse what may reach an instance's API port unless it is namespace names
    (``--allow-from``) and CIDRs (``--admin-from``), at least one of them: the chart's
    NetworkPolicy with no peer at all admits anyone."""
    bad = [f"--allow-from {ns!r} is not a namespace name" for ns in allow_from
           if not _NAMESPACE.match(ns)]
    for cidr in admin_from:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            bad.append(f"--admin-from {cidr!r} is not a CIDR (like 10.0.0.2/32)")
        else:
            if "/" not in cidr:
                bad.append(f"--admin-from {cidr!r} is not a CIDR: add its prefix length "
                           f"({cidr}/{128 if ':' in cidr else 32})")
    if bad:
        raise UsageError("; ".join(bad))
    if not allow_from and not admin_from:
        raise UsageError("nothing may reach the instance's API port: an empty --allow-from "
                         "would make its NetworkPolicy admit anyone",
                         hint="name the ingress controller's namespace: --allow-from NS")


def chart_overrides(name: str, *, replicas: int, gpus: int, host: str | None,
                    tls_secret: str | None, version: str | None, storage_mode: str,
                    allow_from: list[str], admin_from: list[str]) -> Obj:
    """The values an instance holds over the user's -f/--set (see the module docstring)."""
    check_peers(allow_from, admin_from)
    peers: list[Obj] = [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": ns}}} for ns in allow_from]
    peers += [{"ipBlock": {"cidr": cidr}} for cidr in admin_from]
    values: Obj = {
        "fullnameOverride": FULLNAME,
        "replicaCount": replicas,
        "gpu": {"count": gpus},
        "storage": {"mode": storage_mode},
        "apiKey": {"enabled": True, "existingSecret": KEYS_SECRET, "secretKey": KEYS_FILE},
        "usageLog": {"enabled": True},
        "nodeSelector": {DEDICATED: name},
        "tolerations": [toleration(name)],
        "p2p": {"enabled": False},  # seeders would serve other instances' fetches
        "autoscaling": {"enabled": False},  # the quota is sized for --replicas
        "serviceAccount": {"automountToken": False},
        "networkPolicy": {"enabled": True, "allowedFrom": peers},
        "commonLabels": {INSTANCE: name},
        # Prometheus scrapes /metrics with the operator key: the hashed key file has none to send
        "metrics": {"serviceMonitor": {"keySecret": {"name": OPERATOR_SECRET, "key": OPERATOR_FILE}}},
        "ingress": {"enabled": bool(host), "hosts": [host] if host else [],
                    "tls": [{"secretName": tls_secret, "hosts": [host]}] if tls_secret else []},
    }
    if version:
        values["image"] = {"tag": version}
    return values


# ---- the quota, summed from the rendered release ---------------------------------------------

_SUFFIX: dict[str, Fraction | int] = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18}


def quantity(text: Any) -> Fraction:
    """A Kubernetes quantity ("24Gi", "500m", "4", 2) as an exact number."""
    raw = str(text).strip()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if raw.endswith(suffix) and raw[:-len(suffix)]:
            return Fraction(raw[:-len(suffix)]) * _SUFFIX[suffix]
    return Fraction(raw)


def format_quantity(value: Fraction, binary: bool) -> str:
    if binary:
        mib = math.ceil(value / 2**20)
        return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"
    milli = math.ceil(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _pod_needs(spec: Obj, gpu_resource: str) -> dict[str, Fraction]:
    """What one pod counts against a quota: per resource, the larger of its containers' sum
    and its largest init container (the scheduler's rule), LimitRange defaults filled in."""
    fields = {"requests.cpu": ("requests", "cpu"), "requests.memory": ("requests", "memory"),
              "limits.memory": ("limits", "memory"), f"requests.{gpu_resource}":
              ("requests", gpu_resource)}
    defaults = {"requests": CONTAINER_DEFAULTS["defaultRequest"],
                "limits": CONTAINER_DEFAULTS["default"]}

    def need(container: Obj, kind: str, resource: str) -> Fraction:
        stated = (container.get("resources") or {}).get(kind) or {}
        if resource in stated:
            return quantity(stated[resource])
        if resource == gpu_resource:
            return Fraction(0)
        if kind == "requests" and resource in ((container.get("resources") or {}).get("limits") or {}):
            return quantity(container["resources"]["limits"][resource])  # request = limit
        return quantity(defaults[kind].get(resource, "0"))

    out = {}
    for field, (kind, resource) in fields.items():
        running = sum((need(c, kind, resource) for c in spec.get("containers") or []), Fraction(0))
        init = max((need(c, kind, resource) for c in spec.get("initContainers") or []),
                   default=Fraction(0))
        out[field] = max(running, init)
    return out


def quota(name: str, objects: list[Obj], *, gpu_resource: str = "nvidia.com/gpu",
          floor: Obj | None = None) -> Obj:
    """The ResourceQuota for a rendered release (objects and hooks): every pod it can run at
    once, and its claims. ``floor`` (the current quota's ``hard``) keeps claims and storage from
    shrinking below what retained claims (of paused or scaled-down replicas) already hold."""
    totals: dict[str, Fraction] = {"pods": Fraction(0), "persistentvolumeclaims": Fraction(0),
                                   "requests.storage": Fraction(0)}
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None and obj["kind"] in ("StatefulSet", "Deployment", "Pod", "Job"):
            count = int(obj["spec"].get("replicas", 1)) if obj["kind"] != "Pod" else 1
            totals["pods"] += count
            for field, amount in _pod_needs(spec, gpu_resource).items():
                totals[field] = totals.get(field, Fraction(0)) + amount * count
            for template in obj["spec"].get("volumeClaimTemplates") or []:
                size = template["spec"]["resources"]["requests"]["storage"]
                totals["persistentvolumeclaims"] += count
                totals["requests.storage"] += quantity(size) * count
        elif obj["kind"] == "PersistentVolumeClaim":
            totals["persistentvolumeclaims"] += 1
            totals["requests.storage"] += quantity(obj["spec"]["resources"]["requests"]["storage"])
    for field in ("persistentvolumeclaims", "requests.storage"):
        if floor and field in floor:
            totals[field] = max(totals[field], quantity(floor[field]))
    hard = {field: format_quantity(v, binary=field.endswith(("memory", "storage")))
            for field, v in sorted(totals.items())}
    hard["services.loadbalancers"] = "0"  # the endpoint is the Ingress, never its own address
    hard["services.nodeports"] = "0"
    return {"apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": _meta(name, "weightship-quota", namespace_of(name)),
            "spec": {"hard": hard}}


def widest(a: Obj, b: Obj) -> Obj:
    """A quota that allows what either allows (held while replicas change)."""
    hard = dict(a["spec"]["hard"])
    for field, value in b["spec"]["hard"].items():
        if field not in hard or quantity(value) > quantity(hard[field]):
            hard[field] = value
    return {**a, "spec": {"hard": hard}}
