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
from instance_helpers import prepare_two_pools
from k8s_helpers import default_storage_class, gpu_node, namespace

from weightship.settings import get_settings


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
def two_pools(bare_cluster: FakeKube) -> FakeKube:
    """A cluster for two companies: acme's two tainted GPU nodes, globex's one, a shared GPU
    node, a default StorageClass and the API server's endpoints."""
    return prepare_two_pools(bare_cluster)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``weightship ARGS…`` in-process; returns (exit code, stdout, stderr)."""
    from weightship.cli import _common
    from weightship.cli import app as app_module

    app: typer.Typer = app_module.app
    monkeypatch.delenv("WEIGHTSHIP_DEBUG", raising=False)
    get_settings.cache_clear()

    def run(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        _common._state.json = _common._state.quiet = _common._state.emitted = False
        code = _common.run(app, list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run

