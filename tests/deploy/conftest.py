"""Fixtures of the Kubernetes deployer's tests.

The cluster is the generic fake API server of ``fakekube.py`` (the one mock: no Kubernetes API
server can run here), seeded the way an administrator would set a GPU cluster up: a namespace,
GPU nodes with NVIDIA feature-discovery labels, a default StorageClass. Helm (helm-python-sdk)
and the ``kubernetes`` client reach it through a kubeconfig file named by ``KUBECONFIG``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from fakekube import FakeKube, running

from weightship.settings import get_settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "weightship"


def gpu_node(name: str, gpus: int = 1, memory_mib: int | None = 81559, **labels: str) -> dict:
    """A Node as the NVIDIA device plugin and GPU feature discovery would leave it."""
    node_labels = {"kubernetes.io/hostname": name, **labels}
    if memory_mib is not None:
        node_labels["nvidia.com/gpu.memory"] = str(memory_mib)
    allocatable = {"cpu": "32", "memory": "256Gi"}
    if gpus:
        allocatable["nvidia.com/gpu"] = str(gpus)
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": node_labels},
            "status": {"allocatable": allocatable, "capacity": allocatable}}


def default_storage_class(name: str = "standard") -> dict:
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name, "annotations": {
                "storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "example.com/fake"}


def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def secret(name: str, ns: str, **data: str) -> dict:
    import base64

    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "Opaque", "data": {k: base64.b64encode(v.encode()).decode()
                                       for k, v in data.items()}}


@pytest.fixture
def bare_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    """A fake API server with nothing in it, reached through ``KUBECONFIG``."""
    with running(ready_delay=0.2) as fake:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(fake.kubeconfig())
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield fake


@pytest.fixture
def cluster(bare_cluster: FakeKube) -> FakeKube:
    """A ready GPU cluster: namespace ``ml``, two 80 GB single-GPU nodes, a default class."""
    bare_cluster.seed(namespace("ml"))
    bare_cluster.seed(gpu_node("gpu-a"))
    bare_cluster.seed(gpu_node("gpu-b"))
    bare_cluster.seed(default_storage_class())
    return bare_cluster


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``weightship ARGS…`` in-process; returns (exit code, stdout, stderr)."""
    from weightship.cli import _common, deploy
    from weightship.cli import app as app_module

    app: typer.Typer = app_module.app
    if not any(g.name == "deploy" for g in app.registered_groups):
        app.add_typer(deploy.app, name="deploy")  # until the app wires the group itself
    monkeypatch.delenv("WEIGHTSHIP_DEBUG", raising=False)
    get_settings.cache_clear()

    def run(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        _common._state.json = _common._state.quiet = _common._state.emitted = False
        code = _common.run(app, list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run

