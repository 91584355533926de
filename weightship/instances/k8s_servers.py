"""A Kubernetes instance's Secrets and its server pods: the key file written where the servers
reload it, and the usage records read from each server.

Usage records are read from each running server pod's ``GET /v1/usage`` through the API
server's pod proxy (``pods/POD:PORT/proxy/v1/usage``), with the instance's operator key in the
``X-Weightship-Key`` header (the API server consumes ``Authorization`` for itself). This needs
no exec and no extra pod, and works with any storage mode; a replica that is not running
(paused, scaled down) keeps its records on its claim and is reported as not reached.
"""

from __future__ import annotations

import base64
from typing import Any

from weightship.deploy.k8s.cluster import Cluster
from weightship.deploy.k8s.release import Releases
from weightship.errors import ClusterConflictError, InstanceError
from weightship.instances import k8s_objects as objs
from weightship.instances.target import UsageRead
from weightship.runtime.keys import KeyFile, parse_hashed
from weightship.runtime.usage import parse_records

Obj = dict[str, Any]


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


def write_keys(cluster: Cluster, name: str, keys: KeyFile, version: str) -> None:
    """Store ``keys`` in the instance's Secret, if it is still at ``version`` (the one read)."""
    secret = objs.keys_secret(name, keys.to_text())
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


def usage_records(cluster: Cluster, name: str, *, context: str | None) -> UsageRead:
    """Every usage record of every running server pod (see the module docstring)."""
    operator_key, _ = secret_text(cluster, name, objs.OPERATOR_SECRET, objs.OPERATOR_FILE)
    namespace = objs.namespace_of(name)
    with Releases(namespace, context=context) as releases:
        port = int(((releases.values(name).get("serve") or {}).get("port")) or 8000)
    read = UsageRead()
    pods = server_pods(cluster, name)
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        if (pod.get("status") or {}).get("phase") != "Running":
            read.unreached.append(f"pod {pod_name} ({(pod.get('status') or {}).get('phase')})")
            continue
        status, data = cluster.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods/{pod_name}:{port}/proxy/v1/usage",
            headers={"X-Weightship-Key": operator_key, "Accept": "application/x-ndjson"},
            timeout=120)
        if status != 200:
            read.unreached.append(f"pod {pod_name} (HTTP {status})")
            continue
        read.sources.append(f"pod {pod_name}")
        read.records += parse_records([data])
    # perPodPVC: a claim models-weightship-N whose pod weightship-N is not running holds
    # records nobody can read now
    for claim in cluster.items(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
                               selector=f"app.kubernetes.io/instance={name}"):
        owner = claim["metadata"]["name"].removeprefix("models-")
        if owner.startswith(objs.FULLNAME + "-") and owner not in {
                p["metadata"]["name"] for p in pods}:
            read.unreached.append(f"claim {claim['metadata']['name']} (pod {owner} not running)")
    return read
