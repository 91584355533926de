"""The Helm engine (PyPI ``helm-python-sdk``: Helm v4's Go SDK in a bundled shared library):
finding the chart, linting it and rendering it offline.

helm-python-sdk needs no ``helm`` binary, Go toolchain or network: its wheel carries
``libhelm_c.so``, which links only against libc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from weightship.errors import DeployError, DeployToolMissingError, InvalidValuesError

CHART_NAME = "weightship"
# Kubernetes versions the chart supports (Chart.yaml kubeVersion) that objects are validated for.
SUPPORTED_KUBERNETES = ("1.29.0", "1.33.0", "1.37.0")


def helm_module() -> ModuleType:
    """``helm_python``, or a clear error when the deploy extra is not installed."""
    try:
        import helm_python
    except ImportError:
        raise DeployToolMissingError("helm-python-sdk") from None
    return helm_python


def chart_path(explicit: Path | None = None) -> Path:
    """The chart directory: ``explicit``, a copy packaged with weightship, or the checkout's."""
    here = Path(__file__).resolve()
    candidates = [explicit] if explicit else [
        here.parent / "chart",  # a wheel that ships the chart as package data
        here.parents[3] / "helm" / CHART_NAME,  # a source checkout (editable install)
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / "Chart.yaml").is_file():
            return candidate
    raise DeployError(f"chart not found (looked in {', '.join(str(c) for c in candidates)})",
                      hint="pass --chart PATH to the helm/weightship directory of a checkout")


@dataclass
class Rendered:
    """A rendered release: manifests by template, the objects in them, and the notes."""

    manifests: dict[str, str]
    objects: list[dict[str, Any]] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)  # helm test pods and the like
    notes: str = ""

    def yaml_stream(self) -> str:
        """Every object (hooks included) as one YAML stream, the way ``helm template`` prints."""
        docs = []
        for path, text in sorted(self.manifests.items()):
            if path.endswith(".yaml") and text.strip():
                docs.append(f"---\n# Source: {path}\n{text.strip()}\n")
        return "".join(docs)


_VALIDATION = re.compile(r"VALUES VALIDATION:\n(.*)", re.S)


def values_problems(message: str) -> list[str]:
    """The "- " lines of a schema or validateValues failure, as separate problems."""
    match = _VALIDATION.search(message)
    body = match.group(1) if match else message
    lines = [line[2:].strip() for line in body.splitlines() if line.startswith("- ")]
    return lines or [message.strip()]


def render(chart: Path, values: dict[str, Any], *, release: str, namespace: str,
           is_upgrade: bool = False) -> Rendered:
    """Render ``chart`` offline with Helm's engine (schema and validateValues included)."""
    helm = helm_module()
    try:
        helm.validate_release_name(release)
    except helm.HelmError as e:
        raise InvalidValuesError([f"release name {release!r}: {e}"]) from None
    try:
        with helm.Chart.load(chart) as loaded:
            manifests = loaded.render(values, name=release, namespace=namespace,
                                      is_install=not is_upgrade, is_upgrade=is_upgrade)
    except helm.HelmValuesError as e:
        raise InvalidValuesError(values_problems(str(e))) from None
    except helm.HelmRenderError as e:
        # The chart's validateValues rules (_validate.tpl) `fail` with this marker: Helm hands a
        # template's `fail` back only as the render error's text, so the marker is the one channel.
        if "VALUES VALIDATION" in str(e):
            raise InvalidValuesError(values_problems(str(e))) from None
        raise DeployError(f"the chart failed to render: {e}") from None
    except helm.HelmError as e:
        raise DeployError(f"cannot load the chart at {chart}: {e}") from None
    rendered = Rendered(manifests)
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            rendered.notes = text
        elif path.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if not doc:
                    continue
                hook = (doc.get("metadata", {}).get("annotations") or {}).get("helm.sh/hook")
                (rendered.hooks if hook else rendered.objects).append(doc)
    return rendered


def effective_values(chart: Path, values: dict[str, Any]) -> dict[str, Any]:
    """The chart's defaults coalesced with ``values``: what a release really uses."""
    helm = helm_module()
    with helm.Chart.load(chart) as loaded:
        merged: dict[str, Any] = loaded.merge_values(values)
    return merged


def lint(chart: Path, values: dict[str, Any], *, kube_version: str | None = None) -> list[str]:
    """``helm lint --strict``: warnings and errors (informational findings are dropped)."""
    helm = helm_module()
    report = helm.lint(chart, values, strict=True,
                       kube_version=f"v{kube_version}" if kube_version else None)
    return [f"{m['path']}: {m['error'].strip()}" for m in report["messages"] if m["severity"] >= 2]
