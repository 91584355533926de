"""What every target of instances implements, and what they share: the instance's spec, its
name rules, and the shapes the CLI prints.

A target (Kubernetes: :mod:`weightship.instances.k8s`; on-prem nodes: :mod:`weightship.instances.nodes`) is a class with
the methods of :class:`Target`. The generic parts — API keys (:mod:`weightship.instances.keys`)
and usage reports (:mod:`weightship.instances.usage`) — work on any target through
:meth:`Target.read_keys`, :meth:`Target.write_keys` and :meth:`Target.usage_records`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from weightship.errors import InvalidInstanceNameError, UsageError
from weightship.runtime.keys import KeyFile

MAX_NAME = 40  # wsi-NAME is a namespace, and NAME-weightship-headless a Service: both ≤ 63
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Info = dict[str, Any]  # what `instance show --json` prints; see Target.show


def check_name(name: str) -> str:
    """``name`` if it can name an instance (a DNS label of at most 40 characters)."""
    if not name or len(name) > MAX_NAME:
        raise InvalidInstanceNameError(name, f"must be 1 to {MAX_NAME} characters long")
    if not _LABEL.match(name):
        raise InvalidInstanceNameError(name, "must be a DNS label: lowercase letters, digits and "
                                             "'-', starting with a letter and not ending with '-'")
    return name


@dataclass(frozen=True)
class InstanceSpec:
    """What ``instance create`` asks for, on any target."""

    name: str
    model: str
    replicas: int = 1
    gpus: int = 1  # per replica; 0 serves on CPU
    host: str | None = None  # the endpoint's public host name (an Ingress on Kubernetes)
    tls_secret: str | None = None
    version: str | None = None  # weightship version to run (the image tag on Kubernetes)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.replicas < 1:
            raise UsageError(f"--replicas must be at least 1, got {self.replicas} "
                             "(pause an instance to run none)")
        if self.gpus < 0:
            raise UsageError(f"--gpus must be 0 or more, got {self.gpus}")
        if self.tls_secret and not self.host:
            raise UsageError("--tls-secret needs --host: TLS is served for that host name")


@dataclass
class UsageRead:
    """The usage records of an instance, from every replica or host that answered.

    A target gives the records it read whole in ``records``, or those it reads as they arrive
    in ``stream`` (an iterator, consumed once, by :meth:`all`); ``sources`` and ``unreached``
    are complete once the records have all been consumed."""

    records: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # replicas/hosts read
    unreached: list[str] = field(default_factory=list)  # replicas/hosts that hold records but
    # could not be read now (a paused or scaled-down replica's volume), with why
    stream: Iterable[dict[str, Any]] = ()

    def all(self) -> Iterator[dict[str, Any]]:
        yield from self.records
        yield from self.stream


class Target(Protocol):
    """One place instances run. Every method raises
    :class:`~weightship.errors.InstanceNotFoundError` for an unknown instance.

    The dictionaries returned by :meth:`show` (and each item of :meth:`list`) have at least:
    ``name``, ``target``, ``model``, ``version``, ``replicas`` (desired while running),
    ``ready``, ``paused``, ``endpoint`` (URL or null), ``created``; a target adds its own keys
    (``namespace``, ``hosts``…).
    """

    kind: str  # "k8s", "nodes": what --on names

    def plan(self, spec: InstanceSpec) -> list[dict[str, Any]]:
        """Every object (or change) ``create`` would make, for ``--dry-run``; touches nothing
        and needs no cluster or host."""
        ...

    def create(self, spec: InstanceSpec, *, wait: bool, timeout: float) -> Info:
        """Check the target (preflight), then make the instance; refuses an existing name."""
        ...

    def list(self) -> list[Info]:
        """Every instance on the target, read from the target itself."""
        ...

    def show(self, name: str) -> Info:
        ...

    def scale(self, name: str, replicas: int, *, wait: bool, timeout: float) -> Info:
        ...

    def upgrade(self, name: str, *, model: str | None, version: str | None, wait: bool,
                timeout: float) -> Info:
        """Roll the instance to a new model and/or version, replica by replica, each gated on
        its health; a failed gate returns it to the previous version and raises
        :class:`~weightship.errors.UpgradeRolledBackError`."""
        ...

    def pause(self, name: str, *, wait: bool, timeout: float) -> Info:
        """Stop every replica (no GPU held); the verified weights stay where they are."""
        ...

    def resume(self, name: str, *, wait: bool, timeout: float) -> Info:
        """Start the replicas a pause stopped, on the weights they kept."""
        ...

    def delete(self, name: str, *, timeout: float) -> Info:
        """Remove everything the instance owns, then check that nothing of it is left
        (:class:`~weightship.errors.InstanceLeftoversError` otherwise)."""
        ...

    def read_keys(self, name: str) -> KeyFile:
        """The instance's hashed key file."""
        ...

    def write_keys(self, name: str, keys: KeyFile) -> None:
        """Store ``keys`` as the instance's key file, where its servers reload it."""
        ...

    def usage_records(self, name: str) -> UsageRead:
        """Every usage record of every replica or host of the instance."""
        ...
