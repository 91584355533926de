"""A Kubernetes instance's Secrets and its server pods: the key file written where the servers
reload it, and the usage records read from each server.

Each server reloads its key file when the kubelet updates the Secret's volume (and reports the
SHA-256 of the file it loaded at ``GET /v1/keys``); after writing the Secret, ``keys add`` and
``keys revoke`` ask every ready server pod, through the pod proxy, until each reports the new
file's digest, for at most :data:`KEYS_WAIT` seconds: a revoked key is then refused by every
server that takes traffic, or the command says which servers still accept it.

Usage records are read from each running server pod's ``GET /v1/usage`` through the API
server's pod proxy (``pods/POD:PORT/proxy/v1/usage``), with the instance's operator key in the
``X-Weightship-Key`` header (the API server consumes ``Authorization`` for itself). This needs
no exec and no extra pod, and works with any storage mode; a replica that is not running
(paused, scaled down) keeps its records on its claim and is reported as not reached.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from weightship.deploy.k8s.cluster import Cluster
from weightship.errors import (
    ClusterConflictError,
    ClusterUnreachableError,
    InstanceError,
    KeysNotLoadedError,
)
from weightship.instances import k8s_objects as objs
from weightship.instances.target import UsageRead
from weightship.runtime.keys import KeyFile, key_hash, parse_hashed
from weightship.runtime.usage import KEYS_ROUTE, USAGE_ROUTE, parse_records

Obj = dict[str, Any]
KEYS_WAIT = 10.0  # seconds for every server to load a new key file (issue 14: "within 10 s")


def secret_text(cluster: Cluster, name: str, secret: str, key: str) -> tuple[str, str]:
    """(the text under ``key`` of the instance's Secret ``secret``, its resourceVersion)."""
    path = f"/api/v1/namespaces/{objs.namespace_of(name)}/secrets/{secret}"
    obj = cluster.get(path)
    data = ((obj or {}).get("data") or {}).get(key)
    if obj is None or data is None:
        raise InstanceError(f"instance {name!r} has no Secret {secret} with {key}",
                            hint="it was not made by weightship instance create; recreate it")
    return base64.b64decode(data).decode(), obj["metadata"].get("resourceVersion", "")


def read_keys(cluster: Cluster, name: str) -> tuple[KeyFile, str]:
    """(the instance's hashed key file, the resourceVersion of its Secret)."""
    text, version = secret_text(cluster, name, objs.KEYS_SECRET, objs.KEYS_FILE)
    return parse_hashed(text, f"Secret {objs.KEYS_SECRET} of instance {name}"), version


def server_pods(cluster: Cluster, name: str) -> list[Obj]:
    return cluster.items(f"/api/v1/namespaces/{objs.namespace_of(name)}/pods",
                         selector=f"app.kubernetes.io/instance={name},"
                                  "app.kubernetes.io/component=server")


def _port(pod: Obj) -> int:
    """The API port of a server pod (its container port named ``http``)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http" and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return 8000


def _ready(pod: Obj) -> bool:
    """Whether ``pod`` runs and takes traffic (its Ready condition holds)."""
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or [])


def _ask(cluster: Cluster, pod: Obj, route: str, operator_key: str, *,
         query: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """GET ``route`` of a server pod through the API server's pod proxy, with the operator key."""
    meta = pod["metadata"]
    return cluster.request(
        "GET", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}:{_port(pod)}/proxy"
               f"{route}", query=query, timeout=timeout,
        headers={"X-Weightship-Key": operator_key, "Accept": "application/json"})


def write_keys(cluster: Cluster, name: str, keys: KeyFile, version: str, *,
               wait: float = KEYS_WAIT) -> None:
    """Store ``keys`` in the instance's Secret, if it is still at ``version`` (the one read),
    then wait up to ``wait`` seconds for every ready server to load them (raises
    :class:`KeysNotLoadedError` naming those that did not)."""
    text = keys.to_text()
    secret = objs.keys_secret(name, text)
    secret["metadata"]["resourceVersion"] = version
    namespace = objs.namespace_of(name)
    try:
        written = cluster.write(
            "PUT", f"/api/v1/namespaces/{namespace}/secrets/{objs.KEYS_SECRET}", secret)
    except ClusterConflictError:
        raise ClusterConflictError(f"the keys of instance {name!r} changed meanwhile; "
                                   "nothing was written", hint="run the command again") from None
    revision = ((written or {}).get("metadata") or {}).get("resourceVersion", "")
    # The kubelet refreshes a Secret volume on its periodic sync (about a minute); a change
    # to the pod makes it sync that pod now, so servers see the new file within seconds.
    for pod in server_pods(cluster, name):
        cluster.write("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}",
                      {"metadata": {"annotations": {"weightship.io/keys-revision": revision}}},
                      content_type="application/merge-patch+json", missing_ok=True)
    wait_for_keys(cluster, name, key_hash(text), wait)


def wait_for_keys(cluster: Cluster, name: str, digest: str, wait: float) -> None:
    """Ask every ready server pod for the digest of its key file until each reports ``digest``,
    for at most ``wait`` seconds."""
    operator_key, _ = secret_text(cluster, name, objs.OPERATOR_SECRET, objs.OPERATOR_FILE)
    pending = {p["metadata"]["name"]: p for p in server_pods(cluster, name) if _ready(p)}
    deadline = time.monotonic() + wait
    while True:
        for pod_name, pod in list(pending.items()):
            status, data = _ask(cluster, pod, KEYS_ROUTE, operator_key,
                                timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            try:
                loaded = json.loads(data).get("digest") if status == 200 else None
            except (ValueError, AttributeError):
                loaded = None
            if loaded == digest:
                del pending[pod_name]
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise KeysNotLoadedError(name, [f"pod {p}" for p in sorted(pending)], wait,
                                     namespace=objs.namespace_of(name))
        time.sleep(0.2)


def _claim(pod: Obj) -> str | None:
    """The claim a server pod keeps its weights and usage log on (its ``models`` volume)."""
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        if volume.get("name") == "models":
            return (volume.get("persistentVolumeClaim") or {}).get("claimName")
    return None


def usage_records(cluster: Cluster, name: str, *, since: datetime | None = None,
                  until: datetime | None = None) -> UsageRead:
    """The usage records of every running server pod that finished in [since, until) (the
    window is applied by each server), read while they arrive (see the module docstring).

    Once they are consumed, ``unreached`` names what holds records that were not read: a pod
    that did not answer (or whose answer was cut short), and each of the instance's claims
    that no pod read mounts (a paused or scaled-down replica's, or a shared claim while no
    pod runs); a pod that is not running but shares a claim that was read is not missing."""
    operator_key, _ = secret_text(cluster, name, objs.OPERATOR_SECRET, objs.OPERATOR_FILE)
    namespace = objs.namespace_of(name)
    pods = server_pods(cluster, name)
    claims = [c["metadata"]["name"] for c in cluster.items(
        f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
        selector=f"app.kubernetes.io/instance={name}")]
    window = {k: v.isoformat() for k, v in (("since", since), ("until", until)) if v}
    read = UsageRead()

    def stream() -> Iterator[Obj]:
        read_claims: set[str | None] = set()
        missing: list[tuple[Obj, str]] = []
        for pod in pods:
            phase = (pod.get("status") or {}).get("phase")
            if phase != "Running":
                missing.append((pod, str(phase)))
                continue
            meta = pod["metadata"]
            path = (f"/api/v1/namespaces/{namespace}/pods/{meta['name']}:{_port(pod)}"
                    f"/proxy{USAGE_ROUTE}")
            try:
                with cluster.stream(path, query=window, timeout=120, headers={
                        "X-Weightship-Key": operator_key,
                        "Accept": "application/x-ndjson"}) as (status, pieces):
                    if status != 200:
                        missing.append((pod, f"HTTP {status}"))
                        continue
                    yield from parse_records(pieces)
            except ClusterUnreachableError as e:
                missing.append((pod, f"cut short: {e}"))
                continue
            read.sources.append(f"pod {meta['name']}")
            read_claims.add(_claim(pod))
        for pod, why in missing:
            claim = _claim(pod)
            if claim is None or claim not in read_claims:
                read.unreached.append(f"pod {pod['metadata']['name']} ({why})")
                read_claims.add(claim)  # named once, by its pod
        read.unreached += [f"claim {c} (no running pod mounts it)" for c in claims
                           if c not in read_claims]

    read.stream = stream()
    return read
