"""Fixtures of the on-prem deployer's tests: a wheelhouse of this checkout, and labs of nodes
(real systemd and sshd in network namespaces; see nodelab.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodelab import Lab, have_lab

ROOT = Path(__file__).resolve().parents[3]
KEY = "sk-weightship-lab-" + "7" * 32  # what the tests' clients send


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of this checkout and everything ``weightship[serve]`` needs, pinned by
    constraints.txt: what an operator copies to nodes that have no internet."""
    reason = have_lab()
    if reason:
        pytest.fail(f"the on-prem tests need the node lab: {reason} (.ci/run installs what it needs)")
    out = tmp_path_factory.mktemp("wheelhouse")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", out, ROOT], check=True, capture_output=True)
    subprocess.run([*pip, "download", "--dest", out, "--only-binary=:all:", "--find-links", out,
                    "-c", ROOT / "constraints.txt", "torch==2.13.0", "weightship[serve]"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def lab4(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Lab]:
    """Four booted nodes, shared by a module's tests (which run in order)."""
    with Lab(4, tmp_path_factory.mktemp("lab4")) as lab:
        yield lab


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(f"# the lab's key\n{KEY}\n")
    return path
