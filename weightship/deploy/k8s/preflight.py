"""Preflight: what the cluster must have before a release can come up, each failure with the
message a person needs (what is missing, and how to fix it).

Checked: the namespace exists (and admits hostPath when nodeCache needs it); nodes advertise
enough allocatable GPUs with enough GPU memory; the P2P seeders, which follow the serving pods
onto GPU nodes by a node label, find a GPU node with that label; the RuntimeClass exists; the StorageClass (or a
default one) exists, or the existing claim is ReadWriteMany; every Secret and key the pods
reference exists, and every ConfigMap and key their volumes mount (fetch.trustKey); the cluster
serves every kind the release creates (ServiceMonitor needs the Prometheus operator).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from weightship.deploy.k8s.cluster import Cluster
from weightship.deploy.k8s.policy import pod_spec
from weightship.errors import PreflightError

Obj = dict[str, Any]
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, set by NVIDIA GPU feature discovery
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"


@dataclass(frozen=True)
class SecretRef:
    """A Secret (and, when known, a key of it) that a pod needs."""

    name: str
    key: str | None
    where: str


def secret_refs(objects: Iterable[Obj]) -> list[SecretRef]:
    """Every Secret key the pods of ``objects`` read, minus Secrets the release creates itself
    and references marked optional."""
    created = {o["metadata"]["name"] for o in objects if o.get("kind") == "Secret"}
    refs: list[SecretRef] = []
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        for pull in spec.get("imagePullSecrets") or []:
            refs.append(SecretRef(pull["name"], None, f"{where} imagePullSecrets"))
        for volume in spec.get("volumes") or []:
            secret = volume.get("secret")
            if secret and not secret.get("optional"):
                keys = [i["key"] for i in secret.get("items") or []] or [None]
                refs += [SecretRef(secret["secretName"], k, f"{where} volume {volume['name']}")
                         for k in keys]
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    refs.append(SecretRef(ref["name"], ref["key"],
                                          f"{where} container {container['name']} env {env['name']}"))
    return [r for r in dict.fromkeys(refs) if r.name not in created]


def config_map_refs(objects: Iterable[Obj]) -> list[SecretRef]:
    """Every ConfigMap key the pods of ``objects`` mount (a missing one holds the pod in
    ContainerCreating), minus volumes marked optional."""
    refs: list[SecretRef] = []
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        for volume in spec.get("volumes") or []:
            config_map = volume.get("configMap")
            if config_map and not config_map.get("optional"):
                keys = [i["key"] for i in config_map.get("items") or []] or [None]
                refs += [SecretRef(config_map["name"], k, f"{where} volume {volume['name']}")
                         for k in keys]
    return list(dict.fromkeys(refs))


def _nodes_fit(nodes: list[Obj], values: Obj) -> list[str]:
    gpu = values.get("gpu") or {}
    count, resource = int(gpu.get("count") or 0), gpu.get("resourceName", "nvidia.com/gpu")
    if count == 0:
        return []
    selector = values.get("nodeSelector") or {}
    with_gpus = [n for n in nodes
                 if int((n.get("status", {}).get("allocatable") or {}).get(resource, 0)) > 0
                 and not n.get("spec", {}).get("unschedulable")]
    if not with_gpus:
        return [f"no schedulable node has allocatable {resource} "
                "(install the NVIDIA device plugin or GPU operator, or set gpu.count=0 for CPU)"]
    labelled = [n for n in with_gpus if all(
        (n["metadata"].get("labels") or {}).get(k) == str(v) for k, v in selector.items())]
    if not labelled:
        return [f"no GPU node matches nodeSelector {selector}"]
    enough = [n for n in labelled
              if int(n["status"]["allocatable"][resource]) >= count]
    if not enough:
        most = max(int(n["status"]["allocatable"][resource]) for n in labelled)
        return [f"gpu.count={count} but no node has more than {most} allocatable {resource}"]
    need = int(gpu.get("minMemoryMiB") or 0)
    if need:
        sizes = [int(m) for n in enough
                 if (m := (n["metadata"].get("labels") or {}).get(GPU_MEMORY_LABEL, "")).isdigit()]
        if not sizes:
            return [f"gpu.minMemoryMiB={need} needs the {GPU_MEMORY_LABEL} node label, which no "
                    "GPU node has (deploy NVIDIA GPU feature discovery, or set gpu.minMemoryMiB=0)"]
        if max(sizes) < need:
            return [f"the model needs {need} MiB of GPU memory but the largest GPU has "
                    f"{max(sizes)} MiB: lower --max-batch / --max-model-len, or use larger GPUs"]
        enough = [n for n in enough
                  if int((n["metadata"].get("labels") or {}).get(GPU_MEMORY_LABEL, 0)) >= need]
    autoscaling = (values.get("autoscaling") or {}).get("enabled")
    replicas = int(values.get("replicaCount", 1))
    fit = sum(int(n["status"]["allocatable"][resource]) // count for n in enough)
    if not autoscaling and fit < replicas:
        return [f"replicaCount={replicas} but the GPU nodes hold only {fit} pod(s) "
                f"of {count} GPU(s) each"]
    return []


def _seeders_placed(nodes: list[Obj], values: Obj) -> list[str]:
    """With p2p.followWorkload the chart keeps the seeders (which request no GPU) to nodes that
    carry p2p.gpuNodeLabel; a cluster where no GPU node has it would run no seeder at all."""
    p2p, gpu = values.get("p2p") or {}, values.get("gpu") or {}
    label = p2p.get("gpuNodeLabel") or ""
    if not (p2p.get("enabled") and p2p.get("followWorkload") and label
            and int(gpu.get("count") or 0) > 0):
        return []
    resource = gpu.get("resourceName", "nvidia.com/gpu")
    with_gpus = [n for n in nodes
                 if int((n.get("status", {}).get("allocatable") or {}).get(resource, 0)) > 0]
    if not with_gpus or any(label in (n["metadata"].get("labels") or {}) for n in with_gpus):
        return []  # no GPU node at all is _nodes_fit's failure
    return [f"p2p.enabled: the seeders run only on GPU nodes labelled {label}, and no GPU node "
            "has that label (deploy NVIDIA GPU feature discovery, or set p2p.gpuNodeLabel to a "
            "label your GPU nodes carry, or to \"\" for none)"]


def _storage(cluster: Cluster, namespace: str, values: Obj) -> list[str]:
    storage = values.get("storage") or {}
    mode = storage.get("mode")
    if mode == "sharedPVC" and storage.get("existingClaim"):
        claim = cluster.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/"
                            f"{storage['existingClaim']}")
        if claim is None:
            return [f"storage.existingClaim {storage['existingClaim']!r} does not exist in "
                    f"namespace {namespace}"]
        if "ReadWriteMany" not in (claim.get("spec", {}).get("accessModes") or []):
            return [f"claim {storage['existingClaim']} is not ReadWriteMany; replicas on "
                    "different nodes could not share it"]
        return []
    if mode not in ("sharedPVC", "perPodPVC"):
        return []
    classes = cluster.items("/apis/storage.k8s.io/v1/storageclasses")
    names = sorted(c["metadata"]["name"] for c in classes) or ["none"]
    wanted = storage.get("storageClassName")
    if wanted:
        if wanted not in names:
            return [f"StorageClass {wanted!r} does not exist (available: {', '.join(names)})"]
        return []
    if not any((c["metadata"].get("annotations") or {}).get(DEFAULT_CLASS) == "true"
               for c in classes):
        return [f"storage.mode={mode} needs a StorageClass but the cluster has no default one: "
                f"set storage.storageClassName (available: {', '.join(names)})"]
    return []


def _secrets(cluster: Cluster, namespace: str, objects: list[Obj]) -> list[str]:
    failures: list[str] = []
    missing: set[str] = set()
    for ref in secret_refs(objects):
        if ref.name in missing:
            continue
        secret = cluster.get(f"/api/v1/namespaces/{namespace}/secrets/{ref.name}")
        if secret is None:
            missing.add(ref.name)
            failures.append(f"Secret {ref.name!r} (needed by {ref.where}) does not exist in "
                            f"namespace {namespace}")
        elif ref.key and ref.key not in (secret.get("data") or {}):
            failures.append(f"Secret {ref.name!r} has no key {ref.key!r} (needed by {ref.where}); "
                            f"it has: {', '.join(sorted(secret.get('data') or {})) or 'no keys'}")
    return failures


def _config_maps(cluster: Cluster, namespace: str, objects: list[Obj]) -> list[str]:
    failures: list[str] = []
    missing: set[str] = set()
    for ref in config_map_refs(objects):
        if ref.name in missing:
            continue
        config_map = cluster.get(f"/api/v1/namespaces/{namespace}/configmaps/{ref.name}")
        keys = {**((config_map or {}).get("data") or {}), **((config_map or {}).get("binaryData") or {})}
        if config_map is None:
            missing.add(ref.name)
            failures.append(f"ConfigMap {ref.name!r} (needed by {ref.where}) does not exist in "
                            f"namespace {namespace}")
        elif ref.key and ref.key not in keys:
            failures.append(f"ConfigMap {ref.name!r} has no key {ref.key!r} (needed by "
                            f"{ref.where}); it has: {', '.join(sorted(keys)) or 'no keys'}")
    return failures


def check(cluster: Cluster, namespace: str, values: Obj, objects: list[Obj], *,
          new_namespace: Obj | None = None, nodes: list[Obj] | None = None) -> list[str]:
    """Every preflight failure, as messages; an empty list means ready to install.

    ``new_namespace``: the namespace object the caller will create (checked instead of the
    cluster's); ``nodes``: the nodes as they will be (default: as the cluster has them)."""
    ns = new_namespace or cluster.get(f"/api/v1/namespaces/{namespace}")
    if ns is None:
        return [f"namespace {namespace!r} does not exist (create it: kubectl create namespace "
                f"{namespace})"]
    failures: list[str] = []
    enforce = (ns["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce")
    if (values.get("storage") or {}).get("mode") == "nodeCache" and enforce in (
            "baseline", "restricted"):
        failures.append(f"namespace {namespace} enforces the {enforce!r} Pod Security Standard, "
                        "which rejects the hostPath volume of storage.mode=nodeCache")
    if nodes is None:
        nodes = cluster.items("/api/v1/nodes")
    failures += _nodes_fit(nodes, values)
    failures += _seeders_placed(nodes, values)
    runtime_class = (values.get("gpu") or {}).get("runtimeClassName")
    if runtime_class and cluster.get(f"/apis/node.k8s.io/v1/runtimeclasses/{runtime_class}") is None:
        failures.append(f"RuntimeClass {runtime_class!r} does not exist (gpu.runtimeClassName)")
    failures += _storage(cluster, namespace, values)
    failures += _secrets(cluster, namespace, objects)
    failures += _config_maps(cluster, namespace, objects)
    for api_version, kind in sorted({(o["apiVersion"], o["kind"]) for o in objects}):
        if not cluster.served(api_version, kind):
            failures.append(f"the cluster does not serve {kind} ({api_version})"
                            + (": install the Prometheus operator or set "
                               "metrics.serviceMonitor.enabled=false" if kind == "ServiceMonitor"
                               else ""))
    return failures


def run(cluster: Cluster, namespace: str, values: Obj, objects: list[Obj]) -> None:
    """:func:`check`, raising :class:`PreflightError` with every failure."""
    failures = check(cluster, namespace, values, objects)
    if failures:
        raise PreflightError(failures)

