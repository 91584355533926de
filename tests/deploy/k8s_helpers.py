"""Helpers of the Kubernetes deployer's tests: paths, and cluster objects as an administrator
would create them (GPU nodes with NVIDIA feature-discovery labels, namespaces, Secrets)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "weightship"


def gpu_node(name: str, gpus: int = 1, memory_mib: int | None = 81559, **labels: str) -> dict[str, Any]:
    """A Node as the NVIDIA device plugin and GPU feature discovery would leave it."""
    node_labels = {"kubernetes.io/hostname": name, **labels}
    if memory_mib is not None and gpus:  # GPU feature discovery's labels
        node_labels["nvidia.com/gpu.memory"] = str(memory_mib)
        node_labels["nvidia.com/gpu.count"] = str(gpus)
    allocatable = {"cpu": "32", "memory": "256Gi"}
    if gpus:
        allocatable["nvidia.com/gpu"] = str(gpus)
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": node_labels},
            "status": {"allocatable": allocatable, "capacity": allocatable}}


def default_storage_class(name: str = "standard") -> dict[str, Any]:
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name, "annotations": {
                "storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "example.com/fake"}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def secret(name: str, ns: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "Opaque", "data": {k: base64.b64encode(v.encode()).decode()
                                       for k, v in data.items()}}
