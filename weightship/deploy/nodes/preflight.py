"""Preflight: what stops a host from taking a release, decided on the facts its agent reports
(``facts`` in :mod:`.agent`) before any host of the rollout is changed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightship.deploy.nodes.steps import HostRun

MIN_PYTHON = (3, 10)
MIN_SYSTEMD = 247  # LoadCredential= and $CREDENTIALS_DIRECTORY
HEADROOM = 2 << 30  # free disk kept beyond the model: logs, caches, the next release


def problems(run: HostRun, facts: dict[str, Any]) -> list[str]:
    """What stops ``run``'s host from taking the release, read from its
    :meth:`~weightship.deploy.nodes.steps.HostRun.facts`."""
    found: list[str] = []
    if not facts["systemd"]:
        found.append("systemd is not running (no /run/systemd/system)")
    elif facts["systemd_version"] < MIN_SYSTEMD:
        found.append(f"systemd {facts['systemd_version']} is too old: the unit needs {MIN_SYSTEMD}+ "
                        "(LoadCredential=)")
    for unsafe in facts["prefix_owners"]:
        found.append(f"{unsafe} can be changed by users other than root: it must be owned by root "
                        "and not group- or world-writable (root writes keys below it)")
    if run.runtime.kind != "venv" and tuple(facts["python"][:2]) < MIN_PYTHON:
        found.append(f"{run.python} is Python {'.'.join(map(str, facts['python']))}; "
                        f"the runtime needs {'.'.join(map(str, MIN_PYTHON))}+")
    if run.want.model_key not in run.state.get("models", []):
        need = (run.want.model_bytes or 0) + HEADROOM
        if facts["free_bytes"] < need:
            found.append(f"{facts['free_bytes']:,} bytes free at {facts['free_at']}, need {need:,} "
                            f"(the model and {HEADROOM >> 30} GiB headroom)")
    if not facts["prefix_traversable"]:
        found.append(f"a parent of {run.paths.prefix} is not searchable by other users: "
                        f"the service user {run.paths.user} could not read the model")
    current_port = (run.state.get("release") or {}).get("port")
    ours = facts["unit_active"] and current_port == run.want.port
    if facts["port_busy"] and not ours:
        found.append(f"port {run.want.port} is in use by another program")
    found += _gpu_problems(run, facts["gpus"])
    for tool in ("flock", "useradd"):
        if not facts[tool]:
            found.append(f"{tool} is not installed")
    return found


def _gpu_problems(run: HostRun, present: list[dict[str, Any]] | None) -> list[str]:
    """Whether the host has the GPUs asked for (``present``: nvidia-smi's, None without it),
    each with room for its share of the model."""
    gpus = run.want.gpu_indices(run.host)
    if not gpus:
        return []
    if present is None:
        return [f"{len(gpus)} GPU(s) asked for, but nvidia-smi is not installed"]
    if len(present) < len(gpus):
        return [f"{len(gpus)} GPU(s) asked for, {len(present)} present"]
    per_gpu = (run.want.model_bytes or 0) / len(gpus) / (1 << 20)
    return [f"GPU {g['index']}: {g['total_mib'] - g['used_mib']} MiB free, "
            f"the model needs about {per_gpu * 1.2:.0f} MiB"
            for g in present[:len(gpus)] if g["total_mib"] - g["used_mib"] < per_gpu * 1.2]
