"""Dedicated instances for companies: one isolated, metered endpoint per company, on
Kubernetes (:mod:`.k8s`) or on the company's own nodes (:mod:`.nodes`).

- :mod:`.target`: the :class:`~.target.Target` interface every target implements, the instance
  spec and name rules;
- :mod:`.k8s` and :mod:`.k8s_objects`: the Kubernetes target;
- :mod:`.keys`: API keys of an instance (only hashes stored), on any target;
- :mod:`.usage`: usage reports summed from the servers' usage records, on any target.

A target plugs in by adding a factory to :data:`TARGETS`: it takes the :class:`TargetOptions`
the command line gathered and returns a :class:`~.target.Target`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from weightship.errors import UsageError
from weightship.instances.target import InstanceSpec, Target, UsageRead, check_name


@dataclass(frozen=True)
class TargetOptions:
    """Everything the command line may say about where instances live; each target reads its
    own fields and ignores the others."""

    # Kubernetes
    context: str | None = None
    chart: Path | None = None
    value_files: tuple[Path, ...] = ()
    sets: tuple[str, ...] = ()
    allow_from: tuple[str, ...] = ("ingress-nginx",)  # namespaces that may reach the API port
    admin_from: tuple[str, ...] | None = None  # CIDRs of the API server (None: look them up)
    keys_wait: float = 10.0  # seconds for every server to load a new key file
    since: datetime | None = None  # the usage records to read: those finished in [since, until)
    until: datetime | None = None
    # on-prem nodes
    inventory: Path | None = None
    hosts: tuple[str, ...] = ()
    group: str | None = None
    port: int | None = None
    # asked before hosts are given to an instance; None: no one can be asked (pass --yes)
    confirm: Callable[[str], bool] | None = None


def _k8s(options: TargetOptions) -> Target:
    from weightship.instances.k8s import K8sTarget

    return K8sTarget(context=options.context, chart=options.chart,
                     value_files=options.value_files, sets=options.sets,
                     allow_from=options.allow_from, admin_from=options.admin_from,
                     keys_wait=options.keys_wait, usage_window=(options.since, options.until))


def _nodes(options: TargetOptions) -> Target:
    from weightship.instances.nodes import NodesTarget

    return NodesTarget(inventory=options.inventory, hosts=options.hosts, group=options.group,
                       port=options.port, confirm=options.confirm)


TARGETS: dict[str, Callable[[TargetOptions], Target]] = {"k8s": _k8s, "nodes": _nodes}


def target(on: str, options: TargetOptions) -> Target:
    """The target ``on`` names ("k8s", "nodes"), made from ``options``."""
    factory = TARGETS.get(on)
    if factory is None:
        raise UsageError(f"instances cannot run on {on!r} yet",
                         hint="targets available: " + ", ".join(sorted(TARGETS)))
    return factory(options)


__all__ = ["TARGETS", "InstanceSpec", "Target", "TargetOptions", "UsageRead", "check_name",
           "target"]
