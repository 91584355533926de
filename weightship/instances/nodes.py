"""Dedicated instances on a company's own servers: hosts of the inventory given to one instance.

An instance NAME on nodes is the on-prem deployment NAME (:mod:`weightship.deploy.nodes`) on
the hosts it was given, with three things of its own on each host, beside the releases:

- ``apps/NAME/instance.json``: the marker that gives the host to NAME (what it serves, on which
  port, whether it is paused). A host with any other deployment is refused: a host is never in
  two instances. ``instance list`` reads these markers from the hosts: nothing is kept on the
  operator's machine;
- ``apps/NAME/keys.json``: the hashed key file (:mod:`weightship.runtime.keys`), which the server
  re-reads when it changes, and ``apps/NAME/operator-key`` (0600 root), the key the health gate
  sends;
- ``/var/lib/weightship/NAME/usage.jsonl``: the server's usage log, read over SSH by
  ``instance usage``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shlex
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from weightship.deploy.nodes import manage, rollout
from weightship.deploy.nodes.inventory import Host, Inventory, load
from weightship.deploy.nodes.layout import Paths
from weightship.deploy.nodes.lock import HostLock
from weightship.deploy.nodes.ssh import Node, on_hosts
from weightship.deploy.nodes.steps import HostRun, agent
from weightship.deploy.nodes.want import Want, plan_runtime
from weightship.errors import (
    InstanceError,
    InstanceExistsError,
    InstanceLeftoversError,
    InstanceNotFoundError,
    RolloutFailedError,
    UpgradeRolledBackError,
    UsageError,
)
from weightship.instances.keys import OPERATOR_KEY
from weightship.instances.target import Info, InstanceSpec, UsageRead, check_name
from weightship.runtime.keys import KeyFile, parse_hashed
from weightship.runtime.usage import parse_records

DEFAULT_PORT = 8000
KEYS_WAIT = 10.0  # seconds: what issue 14 promises for a revoke
T = TypeVar("T")
Hosts = list[Host]  # (inside the class, `list` is the Target method)


class NodesTarget:
    """Instances on the hosts of one inventory."""

    kind = "nodes"

    def __init__(self, *, inventory: Path | None, hosts: tuple[str, ...] = (), group: str | None = None,
                 port: int | None = None, confirm: Callable[[str], bool] | None = None,
                 gate_timeout: float = 900.0) -> None:
        if inventory is None:
            raise UsageError("instances on nodes need --inventory FILE (or WEIGHTSHIP_INVENTORY)")
        self.inventory: Inventory = load(inventory)
        self.hosts, self.group, self.port = hosts, group, port or DEFAULT_PORT
        self.gate_timeout, self.confirm = gate_timeout, confirm
        self._keys_read: dict[str, str] = {}  # instance -> sha256 of the key file read_keys saw

    # ---- reading the hosts ---------------------------------------------------------------------

    def _on_hosts(self, hosts: Hosts, work: Callable[[Node], Awaitable[T]]) -> dict[str, T | Exception]:
        return on_hosts(self.inventory, hosts, work)

    def _census(self, hosts: list[Host] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Per reachable host, its deployments and their instance markers; and why others failed."""
        async def apps(node: Node) -> dict[str, Any]:
            found = await agent(node, "apps", {"prefix": self.inventory.prefix}, python=self.inventory.runtime.python,
                                step="read deployments", timeout=60)
            return dict(found["apps"])

        read = self._on_hosts(hosts or list(self.inventory.hosts.values()), apps)
        return ({h: r for h, r in read.items() if not isinstance(r, Exception)},
                {h: str(r) for h, r in read.items() if isinstance(r, Exception)})

    def _members(self, name: str) -> tuple[list[Host], dict[str, Any]]:
        """The hosts given to instance ``name`` and its marker (from the first of them)."""
        check_name(name)
        census, unreached = self._census()
        hosts = [self.inventory.hosts[h] for h, apps in census.items()
                 if (apps.get(name) or {}).get("instance") == name]
        if not hosts:
            where = str(self.inventory.path) + (f" (unreachable: {', '.join(unreached)})" if unreached else "")
            raise InstanceNotFoundError(name, where)
        marker = census[hosts[0].name][name]
        # The marker names every host of the instance, those that cannot be reached now too.
        named = [self.inventory.hosts[h] for h in marker.get("hosts", []) if h in self.inventory.hosts]
        return named or hosts, marker

    # ---- the Target interface --------------------------------------------------------------------

    def plan(self, spec: InstanceSpec) -> list[dict[str, Any]]:
        hosts = self._given(spec)
        paths = Paths(self.inventory.prefix, spec.name)
        from weightship.deploy.nodes.layout import render_unit

        unit = render_unit(paths, gpus=tuple(range(spec.gpus)), key_mode="instance")
        return [{"host": h.name, "address": h.address, "unit": paths.unit_path, "unit_text": unit,
                 "files": [paths.instance_file, paths.keys_file, paths.operator_key, paths.releases, paths.usage_log],
                 "endpoint": f"http://{h.address}:{self.port}"} for h in hosts]

    def _given(self, spec: InstanceSpec) -> list[Host]:
        if not self.hosts and not self.group:
            raise UsageError("an instance on nodes needs its hosts: --hosts a,b or --group G")
        hosts = self.inventory.select(group=self.group, hosts=list(self.hosts) or None)
        if spec.replicas not in (1, len(hosts)):
            raise UsageError(f"an instance on nodes runs one replica per host: {len(hosts)} host(s) given, "
                             f"--replicas {spec.replicas}")
        return hosts

    def create(self, spec: InstanceSpec, *, wait: bool, timeout: float) -> Info:
        hosts = self._given(spec)
        runtime = plan_runtime(self.inventory)
        if spec.version and spec.version != runtime.version:
            raise UsageError(f"--version {spec.version}: the inventory's runtime has weightship {runtime.version}")
        census, unreached = self._census()
        if unreached:
            raise InstanceError(f"cannot check every host of {self.inventory.path}: "
                                + "; ".join(f"{h}: {why}" for h, why in unreached.items()))
        if any(spec.name in apps for apps in census.values()):
            raise InstanceExistsError(spec.name, str(self.inventory.path))
        for host in hosts:
            others = sorted(census[host.name])
            if others:
                raise InstanceError(f"host {host.name} already serves {', '.join(others)}: a host is given to one "
                                    "instance only", hint="give the instance other hosts (--hosts / --group)")
        if self.confirm is None:
            raise UsageError("instance create asks before changing hosts: pass --yes")
        if not self.confirm(f"Give {', '.join(h.name for h in hosts)} to instance {spec.name}?"):
            raise UsageError("not created")
        keys = KeyFile(instance=spec.name)
        _, operator_key = keys.add(OPERATOR_KEY, scopes=("inference", "usage"))
        marker = {"instance": spec.name, "model": spec.model, "port": self.port, "gpus": spec.gpus,
                  "hosts": [h.name for h in hosts], "paused": False,
                  "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        paths = Paths(self.inventory.prefix, spec.name)

        async def claim(node: Node) -> None:
            # Checked again under the host's lock: two creates at once cannot both take it.
            lock = HostLock(node, self.inventory.prefix, self.inventory.runtime.python)
            await lock.acquire()
            try:
                found = await agent(node, "apps", {"prefix": self.inventory.prefix},
                                    python=self.inventory.runtime.python, step="read deployments", timeout=60)
                if found["apps"]:
                    raise InstanceError(f"host {node.host.name} already serves {', '.join(sorted(found['apps']))}: "
                                        "a host is given to one instance only")
                await node.write(paths.keys_file, keys.to_text(), step="key file")
                await node.write(paths.operator_key, operator_key + "\n", mode=0o600, step="operator key")
                await node.write(paths.instance_file, json.dumps(marker, indent=2) + "\n", step="claim host")
            finally:
                lock.release()

        self._raise_failures(self._on_hosts(hosts, claim))
        try:
            rollout.deploy(self.inventory, hosts, self._want(spec.name, spec.model, spec.gpus),
                           max_unavailable="100%")
        except RolloutFailedError as e:
            raise InstanceError(f"instance {spec.name!r} could not start: {e.message}",
                                hint=f"see `weightship instance show {spec.name}`; delete it with "
                                     f"`weightship instance delete {spec.name} --yes`") from None
        return self.show(spec.name)

    def _want(self, name: str, model: str, gpus: int) -> Want:
        return Want(name=name, model=model, port=self.port, gpus=gpus, key_mode="instance",
                    gate_timeout=self.gate_timeout)

    @staticmethod
    def _raise_failures(results: dict[str, Any]) -> None:
        failed = {h: r for h, r in results.items() if isinstance(r, Exception)}
        if failed:
            raise InstanceError("; ".join(f"{h}: {r}" for h, r in failed.items()))

    def list(self) -> list[Info]:
        census, _ = self._census()
        names = sorted({m["instance"] for apps in census.values() for m in apps.values() if m and "instance" in m})
        return [self.show(n) for n in names]

    def show(self, name: str) -> Info:
        hosts, marker = self._members(name)
        status = manage.status(self.inventory, hosts, name, verify=False)
        port = marker.get("port", DEFAULT_PORT)
        return {"name": name, "target": self.kind, "model": marker.get("model"),
                "version": next((s.get("runtime") for s in status if s.get("runtime")), None),
                "replicas": len(hosts), "ready": sum(1 for s in status if s.get("ready")),
                "paused": bool(marker.get("paused")),
                "endpoint": [f"http://{h.address}:{port}" for h in hosts], "created": marker.get("created"),
                "hosts": {s["host"]: {"reachable": s["reachable"], "unit": s.get("unit"), "release": s.get("release"),
                                      "ready": s.get("ready")} for s in status},
                "gpus": marker.get("gpus")}

    def scale(self, name: str, replicas: int, *, wait: bool, timeout: float) -> Info:
        raise UsageError("an instance on nodes runs one replica on each host it was given",
                         hint=f"to change its hosts, delete it and create it on others: "
                              f"weightship instance delete {name} --yes")

    def upgrade(self, name: str, *, model: str | None, version: str | None, wait: bool, timeout: float) -> Info:
        hosts, marker = self._members(name)
        runtime = plan_runtime(self.inventory)
        if version and version != runtime.version:
            raise UsageError(f"--version {version}: the inventory's runtime has weightship {runtime.version}",
                             hint="point the inventory's runtime at a wheelhouse of that version")
        new_model = model or marker["model"]
        self.port = marker.get("port", DEFAULT_PORT)
        try:
            rollout.deploy(self.inventory, hosts, self._want(name, new_model, marker.get("gpus", 0)))
        except RolloutFailedError as e:
            raise UpgradeRolledBackError(name, "upgrade", e.message, "before") from None
        self._mark(hosts, name, {**marker, "model": new_model})
        return self.show(name)

    def _mark(self, hosts: Hosts, name: str, marker: dict[str, Any]) -> None:
        path = Paths(self.inventory.prefix, name).instance_file

        async def write(node: Node) -> None:
            await node.write(path, json.dumps(marker, indent=2) + "\n", step="instance marker")

        self._raise_failures(self._on_hosts(hosts, write))

    def pause(self, name: str, *, wait: bool, timeout: float) -> Info:
        hosts, marker = self._members(name)
        unit = shlex.quote(Paths(self.inventory.prefix, name).unit)

        async def stop(node: Node) -> None:
            await node.run(f"systemctl disable --now --quiet {unit}", step="pause", timeout=300)

        self._raise_failures(self._on_hosts(hosts, stop))
        self._mark(hosts, name, {**marker, "paused": True})
        return self.show(name)

    def resume(self, name: str, *, wait: bool, timeout: float) -> Info:
        hosts, marker = self._members(name)
        try:
            manage.restart(self.inventory, hosts, name, max_unavailable="100%", gate_timeout=self.gate_timeout)
        except RolloutFailedError as e:
            raise UpgradeRolledBackError(name, "resume", e.message, "before") from None
        self._mark(hosts, name, {**marker, "paused": False})
        return self.show(name)

    def delete(self, name: str, *, timeout: float) -> Info:
        hosts, marker = self._members(name)
        removed = manage.uninstall(self.inventory, hosts, name, purge=True)
        failed = [f"{r['host']}: {r['why']}" for r in removed if not r["removed"]]
        if failed:
            raise InstanceError(f"instance {name!r} could not be removed from every host: {'; '.join(failed)}")
        paths = Paths(self.inventory.prefix, name)

        async def leftovers(node: Node) -> list[str]:
            model = f"{paths.models}/{shlex.quote(Want(name=name, model=marker['model']).model_key)}"
            checks = {paths.app: f"test -e {shlex.quote(paths.app)}",
                      paths.unit_path: f"test -e {shlex.quote(paths.unit_path)}",
                      paths.state: f"test -e {shlex.quote(paths.state)}",
                      paths.cache: f"test -e {shlex.quote(paths.cache)}",
                      model: f"test -e {model}",
                      f"user {paths.user}": f"id -u {shlex.quote(paths.user)} >/dev/null 2>&1"}
            found = []
            for what, check in checks.items():
                if (await node.run(check, step="check leftovers", timeout=30, check=False)).code == 0:
                    found.append(f"{node.host.name}:{what}")
            return found

        left = self._on_hosts(hosts, leftovers)
        self._raise_failures(left)
        remaining = [item for items in left.values() if isinstance(items, list) for item in items]
        if remaining:
            raise InstanceLeftoversError(name, remaining)
        return {"name": name, "target": self.kind, "deleted": True, "hosts": [h.name for h in hosts],
                "model": marker.get("model")}

    def read_keys(self, name: str) -> KeyFile:
        """The instance's key file, the same on every host (else an error: see :meth:`write_keys`)."""
        hosts, _ = self._members(name)
        path = Paths(self.inventory.prefix, name).keys_file

        async def read(node: Node) -> str:
            return (await node.run(f"cat {shlex.quote(path)}", step="read keys", timeout=30)).stdout

        texts = self._on_hosts(hosts, read)
        self._raise_failures(texts)
        if len(set(texts.values())) > 1:
            raise InstanceError(f"the hosts of instance {name!r} hold different key files (a change that did "
                                "not reach every host)", hint="repeat the last `instance keys` command")
        text = str(next(iter(texts.values())))
        self._keys_read[name] = hashlib.sha256(text.encode()).hexdigest()
        return parse_hashed(text, f"{hosts[0].name}:{path}")

    def write_keys(self, name: str, keys: KeyFile) -> None:
        """Write the key file on every host, under each host's lock, only where it is still the
        file :meth:`read_keys` read (two `keys` commands at once cannot lose a revoke)."""
        hosts, _ = self._members(name)
        path = Paths(self.inventory.prefix, name).keys_file
        base = self._keys_read.get(name)

        async def write(node: Node) -> None:
            lock = HostLock(node, self.inventory.prefix, self.inventory.runtime.python)
            await lock.acquire()
            try:
                now = (await node.run(f"cat {shlex.quote(path)}", step="read keys", timeout=30)).stdout
                if base is not None and hashlib.sha256(now.encode()).hexdigest() != base:
                    raise InstanceError(f"the keys of {name!r} changed on {node.host.name} meanwhile",
                                        hint="run the command again")
                await node.write(path, keys.to_text(), step="write keys")
            finally:
                lock.release()

        self._raise_failures(self._on_hosts(hosts, write))
        self._wait_for_keys(name, hosts, "sha256:" + hashlib.sha256(keys.to_text().encode()).hexdigest())

    def _wait_for_keys(self, name: str, hosts: Hosts, digest: str) -> None:
        """Until every serving host reports ``digest`` as its loaded key file (at most
        :data:`KEYS_WAIT` seconds): a revoked key is then refused everywhere, or we say where not."""
        paths = Paths(self.inventory.prefix, name)

        async def wait(node: Node) -> bool:
            deadline = time.monotonic() + KEYS_WAIT
            state = await HostRun.reader(node, self.inventory, name).read_state()
            if state.get("active") != "active":
                return True  # paused: it reads the file when it starts
            port = (state.get("release") or {}).get("port", DEFAULT_PORT)
            while True:
                loaded = await agent(node, "keys_loaded", {"port": port, "key_file": paths.operator_key},
                                     python=self.inventory.runtime.python, step="keys loaded", timeout=30)
                if loaded["digest"] == digest:
                    return True
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.25)

        lagging = [h for h, ok in self._on_hosts(hosts, wait).items() if ok is not True]
        if lagging:
            raise InstanceError(f"the keys of instance {name!r} were stored, but {', '.join(lagging)} did not "
                                f"report loading them within {KEYS_WAIT:g} s",
                                hint=f"check those hosts: weightship nodes status -i {self.inventory.path} "
                                     f"--name {name}")

    def usage_records(self, name: str) -> UsageRead:
        hosts, _ = self._members(name)
        path = shlex.quote(Paths(self.inventory.prefix, name).usage_log)

        async def read(node: Node) -> str:
            return (await node.run(f"cat {path} 2>/dev/null; true", step="read usage", timeout=300)).stdout

        usage = UsageRead()
        for host, text in self._on_hosts(hosts, read).items():
            if isinstance(text, Exception):
                usage.unreached.append(f"{host}: {text}")
                continue
            usage.sources.append(host)
            usage.records.extend(parse_records([text]))
        return usage

