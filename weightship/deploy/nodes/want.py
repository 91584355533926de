"""What a rollout wants, the same on every host, worked out on this machine before any node is
touched: the operator's :class:`Want`, the :class:`RuntimePlan` (the wheelhouse read and hashed
here), and the API key file checked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from weightship.deploy.nodes.inventory import Host, Inventory
from weightship.deploy.nodes.layout import model_key
from weightship.errors import UsageError


@dataclass(frozen=True)
class Want:
    """What the operator asked for, the same on every host."""

    name: str
    model: str
    layout: str | None = None
    revision: str | None = None
    port: int = 8000
    gpus: int | None = None  # per host; None: the inventory's `gpus:`
    serve_args: tuple[str, ...] = ()
    api_keys: str = field(default="", repr=False)  # the key file's text; reaches nodes only on stdin
    key_mode: str = "credential"  # "instance": keys in Paths.keys_file (see layout.render_unit)
    model_bytes: int | None = None  # from the catalog, for the disk check
    gate_timeout: float = 900.0
    step_timeout: float = 1800.0

    @property
    def model_key(self) -> str:
        return model_key(self.model, self.layout, self.revision)

    def gpu_indices(self, host: Host) -> tuple[int, ...]:
        return tuple(range(host.gpus if self.gpus is None else self.gpus))


@dataclass(frozen=True)
class RuntimePlan:
    """The runtime every host gets, as far as this machine knows it before touching a node."""

    kind: str  # venv | wheelhouse | index
    key: str | None  # runtimes/KEY, or None for an existing venv
    version: str | None  # weightship's version in it, when known here
    wheels: tuple[tuple[Path, int, str], ...] = ()  # (file, size, sha256) to copy

    def directory(self, inventory: Inventory) -> str:
        if self.kind == "venv":
            assert inventory.runtime.venv is not None
            return inventory.runtime.venv
        return f"{inventory.prefix}/runtimes/{self.key}"


def plan_runtime(inventory: Inventory) -> RuntimePlan:
    """Read the wheelhouse (hashing every wheel) or note the venv/index the inventory names."""
    rt = inventory.runtime
    if rt.venv is not None:
        return RuntimePlan("venv", None, None)
    if rt.index is not None:
        key = hashlib.sha256(f"{rt.index} {rt.version} {rt.python}".encode()).hexdigest()[:12]
        return RuntimePlan("index", key, rt.version)
    assert rt.wheelhouse is not None
    wheels = sorted(rt.wheelhouse.glob("*.whl"))
    ours = [w for w in wheels if w.name.startswith("weightship-")]
    if len(ours) != 1:
        raise UsageError(f"the wheelhouse {rt.wheelhouse} must hold exactly one weightship wheel, "
                         f"found {len(ours)}",
                         hint="make it with: pip wheel --wheel-dir DIR 'weightship[serve]' (see README)")
    entries = []
    for wheel in wheels:
        digest = hashlib.sha256()
        with wheel.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        entries.append((wheel, wheel.stat().st_size, digest.hexdigest()))
    key = hashlib.sha256("".join(f"{w.name} {s} {d}\n" for w, s, d in entries).encode()
                         + rt.python.encode()).hexdigest()[:12]
    return RuntimePlan("wheelhouse", key, ours[0].name.split("-")[1], tuple(entries))


def check_api_keys(text: str, source: str) -> str:
    """The key file's text, if it holds at least one key."""
    if not any(line.strip() and not line.strip().startswith("#") for line in text.splitlines()):
        raise UsageError(f"{source} holds no API keys")
    return text
