"""The Dockerfile cannot be built here (no container engine); these keep it consistent with
the chart and the package, so an image built from it is one the chart can run."""

from __future__ import annotations

import re

import yaml
from k8s_helpers import CHART, REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_image_user_is_the_charts_non_root_uid() -> None:
    uid = yaml.safe_load((CHART / "values.yaml").read_text())["uid"]
    assert uid != 0
    assert re.search(rf"^USER {uid}:{uid}$", DOCKERFILE, re.M)
    assert f"--uid {uid} --gid {uid}" in DOCKERFILE


def test_torch_is_pinned_as_in_pyproject() -> None:
    pins = re.findall(r'"torch==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert len(set(pins)) == 1
    assert f"ARG TORCH_VERSION={pins[0]}" in DOCKERFILE
    assert 'pip install "torch==${TORCH_VERSION}"' in DOCKERFILE


def test_image_runs_what_the_chart_runs() -> None:
    assert 'ENTRYPOINT ["weightship"]' in DOCKERFILE
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"EXPOSE {values['serve']['port']} {values['p2p']['port']}" in DOCKERFILE
    assert "FROM ${CUDA_BASE}" in DOCKERFILE and "nvidia/cuda:" in DOCKERFILE
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_image_can_build_what_torch_compile_builds_at_run_time() -> None:
    """Triton compiles a C launcher at the first compiled decode step: a compiler and Python's
    headers must be in the image, and its caches on a volume the chart mounts (the root
    filesystem is read-only)."""
    install = next(line for line in DOCKERFILE.splitlines() if "apt-get install" in line)
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(install.split())
    server = (CHART / "templates" / "_server.tpl").read_text()
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert re.search(rf"name: {var}\n\s+value: /cache/", server), var
