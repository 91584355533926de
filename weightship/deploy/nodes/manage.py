"""What follows a rollout: status, rollback, restart (after a pause), uninstall and logs.

Rollback and restart switch hosts to a release they already have, through the same rolling,
gated switch as a rollout (:class:`~weightship.deploy.nodes.rollout.Rollout`). Status, uninstall
and logs work on every host at once; one host that cannot be reached is a row of its own and
never stops the others.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import Any

from weightship.deploy.nodes.inventory import Host, Inventory
from weightship.deploy.nodes.layout import Paths
from weightship.deploy.nodes.lock import HostLock
from weightship.deploy.nodes.rollout import (
    HostResult,
    Rollout,
    Say,
    _quiet,
    parse_max_unavailable,
    release_of,
    run_rollout,
    why,
)
from weightship.deploy.nodes.ssh import Node, on_hosts
from weightship.deploy.nodes.steps import HostRun, agent
from weightship.deploy.nodes.want import Want
from weightship.errors import NodeUnreachableError, UsageError

_MODEL_KEY = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def status(inventory: Inventory, hosts: list[Host], name: str, *, verify: bool = True) -> list[dict[str, Any]]:
    """Per host: reachable, unit state, release, model (and whether it verifies), /ready, GPUs."""
    async def one(node: Node) -> dict[str, Any]:
        run = HostRun.reader(node, inventory, name)
        state = await run.read_state()
        release = state.get("release") or {}
        row: dict[str, Any] = {
            "reachable": True, "unit": f"{state.get('active')} ({state.get('sub')})", "release": state.get("current"),
            "model": release.get("model_key"), "runtime": release.get("runtime_version"), "port": release.get("port"),
            "ready": False, "verified": None, "gpus": (await run.facts())["gpus"]}
        if release:
            row["ready"] = (await agent(node, "ready", {"port": release["port"]}, python=run.python, step="ready",
                                        timeout=30))["ready"]
            if verify:
                model = f"{run.paths.models}/{release['model_key']}"
                done = await node.run(f"{shlex.quote(release['runtime'])}/bin/weightship verify {shlex.quote(model)}",
                                      step="verify", timeout=3600, check=False)
                row["verified"] = done.code == 0
        return row

    rows = []
    results = on_hosts(inventory, hosts, one)
    for host in hosts:
        result = results[host.name]
        base = {"host": host.name, "address": host.address}
        rows.append({**base, **result} if isinstance(result, dict)
                    else {**base, "reachable": not isinstance(result, NodeUnreachableError), "why": why(result)})
    return rows


def rollback(inventory: Inventory, hosts: list[Host], name: str, *, max_unavailable: str = "1",
             max_failures: int = 0, gate_timeout: float = 900.0, say: Say = _quiet) -> list[HostResult]:
    """Return every host to the release before its current one, rolling and gated."""
    def older(state: dict[str, Any]) -> str | None:
        return next((r for r in reversed(state.get("history", [])) if r != state.get("current")), None)

    return _return_to(inventory, hosts, name, older, "no earlier release to go back to",
                      max_unavailable=max_unavailable, max_failures=max_failures, gate_timeout=gate_timeout,
                      say=say)


def restart(inventory: Inventory, hosts: list[Host], name: str, *, max_unavailable: str = "1",
            gate_timeout: float = 900.0, say: Say = _quiet) -> list[HostResult]:
    """Start every host's current release again (after a pause), rolling and gated."""
    return _return_to(inventory, hosts, name, lambda state: state.get("current"), "no release to start",
                      max_unavailable=max_unavailable, max_failures=0, gate_timeout=gate_timeout, say=say)


def _return_to(inventory: Inventory, hosts: list[Host], name: str, pick: Callable[[dict[str, Any]], str | None],
               none: str, *, max_unavailable: str, max_failures: int, gate_timeout: float,
               say: Say) -> list[HostResult]:
    """Switch every host to the release ``pick`` chooses from its state, as a rollout does."""
    limit = parse_max_unavailable(max_unavailable, len(hosts))
    rollout = Rollout(inventory, hosts, Want(name=name, model="", gate_timeout=gate_timeout), say=say)

    async def work(r: Rollout) -> None:
        for run in r.pending():
            target = pick(run.state)
            release = await run.read_release(target) if target else None
            if release is None:
                r.fail(run.host.name, "failed", none)
                continue
            run.want = Want(name=name, model=release["model_ref"], port=release["port"], gate_timeout=gate_timeout,
                            key_mode=release.get("key_mode", "credential"))
            run.unit_text = ""  # never "unchanged": even the current release is started again
            run.release = release_of(release)
            r.results[run.host.name].new = target
        if len(r.failures()) <= max_failures:
            await r.roll(limit, max_failures)

    run_rollout(rollout, work)
    rollout.raise_if_failed()
    return list(rollout.results.values())


def uninstall(inventory: Inventory, hosts: list[Host], name: str, *, purge: bool = False,
              say: Say = _quiet) -> list[dict[str, Any]]:
    """Remove the unit, the releases, the key file and the service user from every host (the
    models too with ``purge``, those no other deployment uses). Each host is a row: removed, or why not."""
    paths = Paths(inventory.prefix, name)

    async def one(node: Node) -> dict[str, Any]:
        lock = HostLock(node, inventory.prefix, inventory.runtime.python)
        await lock.acquire()
        try:
            run = HostRun.reader(node, inventory, name)
            state = await run.read_state()
            models: set[str] = set()
            if purge:
                out = await run.run(f"cat {shlex.quote(paths.releases)}/*/release.json 2>/dev/null; true",
                                    "read releases")
                models = {m for m in re.findall(r'"model_key": "([^"]+)"', out) if _MODEL_KEY.match(m)}
            unit, user = shlex.quote(paths.unit), shlex.quote(paths.user)
            await run.run(f"if [ -e {shlex.quote(paths.unit_path)} ]; then systemctl disable --now --quiet {unit} && "
                          f"rm -f {shlex.quote(paths.unit_path)} && systemctl daemon-reload && "
                          f"{{ systemctl reset-failed {unit} 2>/dev/null || true; }}; fi", "remove unit")
            await run.run(f"rm -rf {shlex.quote(paths.app)} {shlex.quote(paths.state)} {shlex.quote(paths.cache)}",
                          "remove releases")
            await run.run(f"if id -u {user} >/dev/null 2>&1; then userdel {user}; fi", "remove user")
            removed = []
            for key in sorted(models):
                used = await run.run(f"grep -l '\"model_key\": \"{key}\"' {shlex.quote(paths.prefix)}/apps/*/releases/"
                                     "*/release.json 2>/dev/null; true", "check model use")
                if not used.strip():
                    await run.run(f"rm -rf {shlex.quote(paths.models)}/{key}", "purge model")
                    removed.append(key)
            say(node.host.name, f"uninstalled {name}" + (f", removed models {', '.join(removed)}" if removed else ""))
            return {"removed": True, "was": state.get("current"), "models_removed": removed}
        finally:
            lock.release()

    results = on_hosts(inventory, hosts, one)
    return [{"host": h, **r} if isinstance(r, dict) else {"host": h, "removed": False, "why": why(r)}
            for h, r in results.items()]


def logs(inventory: Inventory, hosts: list[Host], name: str, *, lines: int = 50) -> dict[str, str]:
    """The unit's recent journal on each host (or why it could not be read)."""
    if lines < 1:
        raise UsageError("--lines must be at least 1")
    unit = shlex.quote(Paths(inventory.prefix, name).unit)

    async def one(node: Node) -> str:
        return (await node.run(f"journalctl -u {unit} -n {lines} --no-pager -o short-iso", step="logs",
                               timeout=60)).stdout

    return {h: r if isinstance(r, str) else f"(not read: {why(r)})\n"
            for h, r in on_hosts(inventory, hosts, one).items()}
