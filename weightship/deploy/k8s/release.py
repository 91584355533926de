"""Helm releases: install or upgrade, wait for the rollout, status, rollback, uninstall.

Everything goes through Helm v4's own action code (helm-python-sdk), so releases are ordinary
Helm releases (Secrets of type ``helm.sh/release.v1``) that ``helm status``, ``helm history``,
``helm rollback`` and ``helm uninstall`` manage just as well. Waiting uses Helm's kstatus
watcher; our own deadline cancels it, so a timeout is a typed :class:`RolloutTimeoutError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from weightship.deploy.k8s.helm import helm_module
from weightship.errors import (
    ClusterUnreachableError,
    ReleaseError,
    ReleaseNotFoundError,
    RolloutTimeoutError,
)

Release = dict[str, Any]


def kubeconfig_arguments() -> dict[str, str]:
    """How Helm should find the kubeconfig, read from ``KUBECONFIG`` now.

    Helm's Go runtime copies the environment once, when the library loads, so a ``KUBECONFIG``
    set later in this process would be missed: pass it explicitly. Several paths are merged the
    way kubectl merges them. Without ``KUBECONFIG``, Helm falls back to ``~/.kube/config`` and
    then to the in-cluster service account, like the helm CLI.
    """
    paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if len(paths) == 1:
        return {"kubeconfig_path": paths[0]}
    if len(paths) > 1:
        from kubernetes.config.kube_config import KubeConfigMerger

        merged = KubeConfigMerger(os.pathsep.join(paths)).config.value
        return {"kubeconfig_content": yaml.safe_dump(merged)}
    return {}
# Helm's own deadline sits past ours, so that ours fires first and is the one reported.
HELM_DEADLINE_SLACK_S = 60


class Releases:
    """The releases of one namespace, through one Helm configuration."""

    def __init__(self, namespace: str, *, context: str | None = None) -> None:
        self.helm = helm_module()
        self.namespace = namespace
        self.config = self.helm.Config(namespace=namespace, kube_context=context,
                                       **kubeconfig_arguments())

    def close(self) -> None:
        self.config.close()

    def __enter__(self) -> Releases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- errors ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, name: str, timeout: float | None = None) -> Iterator[Any]:
        """Run a Helm action with a cancellable context; map Helm's errors onto ours."""
        context = self.helm.HelmContext()
        timer = threading.Timer(timeout, context.cancel) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            yield context
        except self.helm.HelmCancelledError:
            raise RolloutTimeoutError(
                f"release {name!r} did not become ready within {timeout:.0f}s",
                hint=f"see what is pending: kubectl -n {self.namespace} get pods -l "
                     f"app.kubernetes.io/instance={name}; then weightship deploy status "
                     f"{name} -n {self.namespace}, or rerun with a longer --timeout") from None
        except self.helm.HelmNotFoundError:
            raise ReleaseNotFoundError(name, self.namespace) from None
        except self.helm.HelmKubeError as e:
            raise ClusterUnreachableError(f"Kubernetes API: {e}",
                                          hint="check KUBECONFIG / --context") from None
        except self.helm.HelmError as e:
            raise ReleaseError(f"helm: {e}") from None
        finally:
            if timer:
                timer.cancel()
            context.close()

    # -- reads -------------------------------------------------------------------------------

    def history(self, name: str) -> list[Release]:
        """Every revision of ``name``, oldest first; empty when there is no such release."""
        try:
            with self._errors(name):
                return list(self.config.history(name))
        except ReleaseNotFoundError:
            return []

    def values(self, name: str) -> dict[str, Any]:
        """The values the current revision of ``name`` was installed with (the user's, as
        ``helm get values`` prints them)."""
        with self._errors(name):
            return dict(self.config.get_values(name) or {})

    def list(self) -> list[Release]:
        """The releases of the namespace, in every state."""
        with self._errors(""):
            return [dict(r) for r in self.config.list(all_states=True)]

    def status(self, name: str) -> Release:
        """The current revision of ``name``, with its manifest and notes."""
        with self._errors(name):
            return dict(self.config.status(name))

    # -- writes ------------------------------------------------------------------------------

    def deploy(self, chart: Path, name: str, values: dict[str, Any], *, wait: bool,
               timeout: float, description: str = "weightship deploy k8s") -> Release:
        """Install ``name``, or upgrade it when it exists; wait for the rollout if asked.

        A release whose every revision failed is upgraded too (Helm v4 allows it), so a failed
        first install is fixed by running the same command again."""
        exists = bool(self.history(name))
        wait_mode = "watcher" if wait else None
        helm_timeout = int(timeout) + HELM_DEADLINE_SLACK_S
        with self._errors(name, timeout if wait else None) as context:
            if exists:
                return dict(self.config.upgrade(
                    chart, name, values, context=context, wait=wait_mode, timeout=helm_timeout,
                    description=description))
            return dict(self.config.install(
                chart, name, values, context=context, wait=wait_mode, timeout=helm_timeout,
                description=description))

    def rollback(self, name: str, revision: int | None, *, wait: bool, timeout: float) -> Release:
        """Roll ``name`` back to ``revision`` (default: the previous one), as a new revision."""
        history = self.history(name)
        if not history:
            raise ReleaseNotFoundError(name, self.namespace)
        known = [int(r["revision"]) for r in history]
        if revision is not None and revision not in known:
            raise ReleaseError(f"release {name!r} has no revision {revision}",
                               hint="revisions: " + ", ".join(map(str, known)))
        if revision is None and len(known) < 2:
            raise ReleaseError(f"release {name!r} has only one revision: nothing to roll back to")
        with self._errors(name, timeout if wait else None):
            self.config.rollback(name, version=revision, wait="watcher" if wait else None,
                                 timeout=int(timeout) + HELM_DEADLINE_SLACK_S)
        return self.status(name)

    def uninstall(self, name: str, *, wait: bool, timeout: float) -> Release:
        """Remove ``name`` and its objects (claims annotated ``keep`` stay)."""
        with self._errors(name, timeout if wait else None):
            result = self.config.uninstall(name, wait="watcher" if wait else None,
                                           timeout=int(timeout) + HELM_DEADLINE_SLACK_S)
        return dict(result)
