"""The steps of a rollout on one node: runtime, model, release, switch, gate, roll back.

Each step is idempotent (a rerun after ``kill -9`` finds its work done and moves on) and has a
timeout. Systemd is driven only through ``systemctl`` and read through ``journalctl``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import shlex
from dataclasses import dataclass, field
from typing import Any

from weightship.deploy.nodes.inventory import Host, Inventory
from weightship.deploy.nodes.layout import STOP_TIMEOUT_S, Paths, Release, render_unit
from weightship.deploy.nodes.ssh import Node
from weightship.deploy.nodes.want import RuntimePlan, Want
from weightship.errors import NodeCommandError, UsageError

log = logging.getLogger(__name__)

GATE_PROMPT = "Name three colours."
GATE_TOKENS = 12
KEEP_RELEASES = 2  # releases kept per deployment (current and the one rollback returns to)
SWARM_PORT = 6881  # TCP port the hosts of a rollout serve each other the model's chunks on
# How long a host that has the model serves the others, at most: it stops as soon as every other
# host has verified it (or has been unreachable for a minute); this covers the prepare phase.
SWARM_SEED_FOR = "15m"

_AGENT = (importlib.resources.files("weightship.deploy.nodes") / "agent.py").read_text()


async def agent(node: Node, verb: str, args: dict[str, Any], *, python: str, step: str,
                timeout: float) -> dict[str, Any]:
    """Run a verb of :mod:`weightship.deploy.nodes.agent` on the node (arguments on stdin)."""
    script = f"{_AGENT}\nmain({verb!r}, json.loads({json.dumps(json.dumps(args))}))\n"
    done = await node.run(f"{shlex.quote(python)} -", input=script, step=step, timeout=timeout)
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise NodeCommandError(node.host.name, step, f"unreadable answer: {done.stdout[-200:]!r}") from None
    return result


@dataclass
class HostRun:
    """One host's part of a rollout."""

    node: Node
    inventory: Inventory
    paths: Paths
    want: Want
    runtime: RuntimePlan
    state: dict[str, Any] = field(default_factory=dict)
    release: Release | None = None
    unit_text: str = ""
    runtime_version: str | None = None
    swarm_peers: tuple[str, ...] = ()  # the other hosts of the rollout that fetch the model too

    @classmethod
    def reader(cls, node: Node, inventory: Inventory, name: str) -> HostRun:
        """A run that only reads deployment ``name`` on ``node`` (status, uninstall)."""
        return cls(node, inventory, Paths(inventory.prefix, name), Want(name=name, model=""),
                   RuntimePlan("venv", None, None))

    @property
    def host(self) -> Host:
        return self.node.host

    @property
    def python(self) -> str:
        return self.inventory.runtime.python

    async def run(self, command: str, step: str, timeout: float | None = None, **kw: Any) -> str:
        return (await self.node.run(command, step=step, timeout=timeout or self.want.step_timeout, **kw)).stdout

    # ---- reading ------------------------------------------------------------------------------

    async def read_state(self) -> dict[str, Any]:
        p = self.paths
        self.state = await agent(self.node, "state", {
            "app": p.app, "unit_path": p.unit_path, "unit": p.unit, "models": p.models,
            "runtimes": p.runtimes}, python=self.python, step="read state", timeout=60)
        return self.state

    async def facts(self) -> dict[str, Any]:
        return await agent(self.node, "facts", {"prefix": self.paths.prefix, "port": self.want.port,
                                                "unit": self.paths.unit},
                           python=self.python, step="preflight", timeout=60)

    # ---- preparing (the old release keeps serving) ------------------------------------------------

    async def ensure_runtime(self) -> str:
        """Install (or find) the runtime; returns its directory and sets ``runtime_version``."""
        directory = self.runtime.directory(self.inventory)
        q = shlex.quote(directory)
        if self.runtime.kind != "venv" and self.runtime.key not in self.state.get("runtimes", []):
            pip = f"PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 {q}/bin/pip install -q --no-cache-dir"
            if self.runtime.kind == "wheelhouse":
                wh = f"{self.paths.wheelhouse}/{self.runtime.key}"  # exactly this runtime's wheels
                await self.copy_wheels(wh)
                version = shlex.quote(f"weightship[serve]=={self.runtime.version}")
                install = f"{pip} --no-index --find-links {shlex.quote(wh)} {version}"
            else:
                index = shlex.quote(self.inventory.runtime.index or "")
                spec = f"weightship[serve]=={self.runtime.version}" if self.runtime.version else "weightship[serve]"
                install = f"{pip} --index-url {index} {shlex.quote(spec)}"
            await self.run(f"rm -rf {q} && {shlex.quote(self.python)} -m venv {q} && {install} && touch {q}/.complete",
                           "runtime: install")
        out = await self.run(f"{q}/bin/weightship --version", "runtime: check", timeout=120)
        self.runtime_version = out.split()[-1]
        return directory

    async def copy_wheels(self, wh: str) -> None:
        """The runtime's wheels in ``wh`` on the node, each one's sha256 checked there; a wheel
        that fails its check is copied again, once."""
        sums = "".join(f"{d}  {w.name}\n" for w, _, d in self.runtime.wheels)
        await self.run(f"mkdir -p {shlex.quote(wh)}", "runtime: wheelhouse")
        for attempt in range(2):
            bad = (await self.node.run(f"cd {shlex.quote(wh)} && sha256sum -c - 2>/dev/null | grep -v ': OK$'; true",
                                       step="runtime: check wheels", timeout=self.want.step_timeout,
                                       input=sums)).stdout
            names = {line.rsplit(":", 1)[0] for line in bad.splitlines() if ":" in line}
            if not names:
                return
            if attempt:
                raise NodeCommandError(self.host.name, "runtime: check wheels",
                                       f"{', '.join(sorted(names))} do not match their sha256 after copying")
            await self.run(f"cd {shlex.quote(wh)} && rm -f -- " + " ".join(shlex.quote(n) for n in sorted(names)),
                           "runtime: wheelhouse")
            await self.node.upload([w for w, _, _ in self.runtime.wheels if w.name in names], wh,
                                   step="runtime: copy wheels", timeout=self.want.step_timeout)

    async def ensure_user(self) -> None:
        user = shlex.quote(self.paths.user)
        await self.run(f"id -u {user} >/dev/null 2>&1 || useradd --system --user-group --no-create-home "
                       f"--home-dir /nonexistent --shell /usr/sbin/nologin {user}", "service user")

    async def ensure_model(self, runtime: str) -> None:
        """Fetch and verify the model on the node (resumable), then make it read-only to all."""
        key = self.want.model_key
        if key in self.state.get("models", []):
            return
        directory = f"{self.paths.models}/{key}"
        args = [*(["--layout", self.want.layout] if self.want.layout else []),
                *(["--revision", self.want.revision] if self.want.revision else []), *self.inventory.fetch_args]
        if self.swarm_peers:  # one swarm: the origin sends about one copy for the whole rollout
            args += ["--listen", f"0.0.0.0:{SWARM_PORT}", "--seed-for", SWARM_SEED_FOR,
                     *(a for peer in self.swarm_peers for a in ("--peer", _endpoint(peer, SWARM_PORT)))]
        for local in self.inventory.fetch_trust_keys:
            try:
                text = local.read_text()
            except OSError as e:
                raise UsageError(f"cannot read the trust key {local}: {e.strerror or e}") from None
            remote = f"{self.paths.prefix}/trust/{hashlib.sha256(text.encode()).hexdigest()[:16]}.pub"
            await self.node.write(remote, text, step="trust key")
            args += ["--trust-key", remote]
        result = await agent(self.node, "fetch", {
            "weightship": f"{runtime}/bin/weightship", "ref": self.want.model, "to": directory,
            "args": args, "env": self.inventory.fetch_env, "home": f"{self.paths.prefix}/home"},
            python=self.python, step="fetch model", timeout=self.want.step_timeout)
        if not result["ok"]:
            raise NodeCommandError(self.host.name, "fetch model", result["why"])
        q = shlex.quote(directory)
        # The runtime loads safetensors only: an original-layout model is converted once, here.
        await self.run(f"if ls {q}/*.pth >/dev/null 2>&1 && ! ls {q}/*.safetensors >/dev/null 2>&1; then "
                       f"{shlex.quote(runtime)}/bin/weightship convert {q}; fi", "convert model")
        await self.run(f"chown -R root:root {q} && chmod -R u+rwX,go+rX,go-w {q}", "model permissions")

    def desired(self, runtime: str, version: str) -> Release:
        """The release this host should run (also sets the unit text it comes with)."""
        gpus = self.want.gpu_indices(self.host)
        self.unit_text = render_unit(self.paths, gpus=gpus, key_mode=self.want.key_mode)
        self.release = Release(
            name=self.want.name, model_ref=self.want.model, model_key=self.want.model_key, layout=self.want.layout,
            runtime=runtime, runtime_version=version, port=self.want.port, gpus=gpus,
            serve_args=self.want.serve_args, unit_sha256=hashlib.sha256(self.unit_text.encode()).hexdigest(),
            key_mode=self.want.key_mode)
        return self.release

    @property
    def keys_sha256(self) -> str:
        return hashlib.sha256(self.want.api_keys.encode()).hexdigest()

    async def write_keys(self) -> None:
        """The deployment's key file (0600 root, outside the releases). The serving process keeps
        the copy it started with until it restarts, so writing it early changes nothing yet."""
        if self.want.key_mode == "credential" and self.state.get("keys_sha256") != self.keys_sha256:
            await self.node.write(self.paths.api_keys, self.want.api_keys, mode=0o600, step="api keys")

    async def write_release(self) -> None:
        """Write releases/REV (once; it is never changed afterwards but for gate.json)."""
        assert self.release is not None
        rel = self.paths.release(self.release.rev)
        tmp = f"{rel}.tmp-weightship"
        if (await self.node.run(f"test -f {shlex.quote(rel)}/release.json", step="release", timeout=30,
                                check=False)).code == 0:
            return
        await self.run(f"rm -rf {shlex.quote(tmp)} && mkdir -p {shlex.quote(tmp)}", "release")
        await self.node.write(f"{tmp}/release.json", json.dumps(self.release.to_json(), indent=2) + "\n",
                              step="release")
        await self.node.write(f"{tmp}/serve.env", self.release.serve_env(), step="release")
        await self.node.write(f"{tmp}/{self.paths.unit}", self.unit_text, step="release")
        model = f"{self.paths.models}/{self.release.model_key}"
        await self.run(f"ln -s {shlex.quote(model)} {shlex.quote(tmp)}/model && "
                       f"ln -s {shlex.quote(self.release.runtime)} {shlex.quote(tmp)}/runtime && "
                       f"chmod 755 {shlex.quote(tmp)} && mv -T {shlex.quote(tmp)} {shlex.quote(rel)}", "release")

    async def verify_unit(self) -> None:
        """``systemd-analyze verify`` the unit as systemd will load it once ``current`` names this
        release, before anything is stopped. A warning about the unit (a setting this systemd
        ignores, so the service would run less hardened than written) fails it too."""
        assert self.release is not None
        rel = self.paths.release(self.release.rev)
        check = f"{self.paths.app}/.verify/{self.paths.unit}"
        await self.node.write(check, self.unit_text.replace(self.paths.current + "/", rel + "/"), step="verify unit")
        done = await self.node.run(f"command -v systemd-analyze >/dev/null || exit 0; "
                                   f"systemd-analyze verify {shlex.quote(check)} 2>&1", step="verify unit",
                                   timeout=120, check=False)
        await self.run(f"rm -rf {shlex.quote(self.paths.app)}/.verify", "verify unit")
        complaints = [line for line in done.stdout.splitlines() if self.paths.unit in line]
        if done.code != 0 or complaints:
            raise NodeCommandError(self.host.name, "systemd-analyze verify",
                                   "; ".join(complaints) or done.stdout.strip() or f"exit {done.code}")

    async def prepare(self) -> Release:
        """Everything up to the switch, while the old release keeps serving."""
        runtime = await self.ensure_runtime()
        assert self.runtime_version is not None
        await self.ensure_user()
        await self.ensure_model(runtime)
        release = self.desired(runtime, self.runtime_version)
        await self.write_keys()
        await self.write_release()
        await self.verify_unit()
        return release

    # ---- switching -------------------------------------------------------------------------------

    def unchanged(self) -> bool:
        """Already on the wanted release with the wanted keys, active, and that release passed its gate."""
        assert self.release is not None
        history = self.state.get("history", [])
        keys_same = self.want.key_mode != "credential" or self.state.get("keys_sha256") == self.keys_sha256
        return (self.state.get("current") == self.release.rev and self.state.get("unit_text") == self.unit_text
                and keys_same and self.state.get("active") == "active" and bool(history)
                and history[-1] == self.release.rev)

    def previous(self) -> str | None:
        """The release to return to: what the host ran when the rollout found it, unless that is the
        wanted one; else the newest other release that passed its gate."""
        assert self.release is not None
        current = self.state.get("current")
        if current and current != self.release.rev and self.state.get("release"):
            return str(current)
        return next((r for r in reversed(self.state.get("history", [])) if r != self.release.rev), None)

    async def switch(self, rev: str) -> None:
        """Drain and stop the unit, point ``current`` at ``rev`` (and its unit), start it."""
        p = self.paths
        unit, rel = shlex.quote(p.unit), shlex.quote(p.release(rev))
        await self.run(f"if [ -e {shlex.quote(p.unit_path)} ]; then systemctl stop {unit}; fi", "drain and stop",
                       timeout=STOP_TIMEOUT_S + 30)
        await self.run(f"cmp -s {rel}/{unit} {shlex.quote(p.unit_path)} || "
                       f"{{ cp {rel}/{unit} {shlex.quote(p.unit_path)}.tmp && mv -f {shlex.quote(p.unit_path)}.tmp "
                       f"{shlex.quote(p.unit_path)} && systemctl daemon-reload; }}", "install unit")
        await self.run(f"ln -sfn releases/{shlex.quote(rev)} {shlex.quote(p.current)}.tmp && "
                       f"mv -Tf {shlex.quote(p.current)}.tmp {shlex.quote(p.current)}", "switch release")
        await self.run(f"systemctl reset-failed {unit} 2>/dev/null; systemctl enable --quiet {unit} && "
                       f"systemctl start {unit}", "start")

    async def gate(self, rev: str, expect: str | None) -> str | None:
        """None if ``rev`` serves (and answers as ``expect`` when given), else why not."""
        release = await self.read_release(rev)
        if release is None:
            return f"release {rev} has no release.json"
        key_file = self.paths.api_keys if release.get("key_mode", "credential") == "credential" \
            else self.paths.operator_key
        result = await agent(self.node, "gate", {
            "port": release["port"], "unit": self.paths.unit, "key_file": key_file,
            "timeout": self.want.gate_timeout, "prompt": GATE_PROMPT, "max_tokens": GATE_TOKENS},
            python=self.python, step="health gate", timeout=self.want.gate_timeout + 60)
        if not result["ok"]:
            tail = " | ".join(result.get("journal", [])[-3:])
            return result["why"] + (f"; journal: {tail}" if tail else "")
        if expect is not None and result["answer"] != expect:
            return f"answer {result['answer']!r} differs from the previous release's {expect!r}"
        record = json.dumps({"prompt": GATE_PROMPT, "answer": result["answer"]}) + "\n"
        await self.node.write(f"{self.paths.release(rev)}/gate.json", record, step="gate record")
        return None

    async def read_release(self, rev: str, name: str = "release.json") -> dict[str, Any] | None:
        """A JSON file of release ``rev`` (release.json or gate.json), or None if it has none."""
        done = await self.node.run(f"cat {shlex.quote(self.paths.release(rev))}/{name}", step="read release",
                                   timeout=30, check=False)
        if done.code != 0:
            return None
        try:
            data = json.loads(done.stdout)
        except ValueError:
            raise NodeCommandError(self.host.name, "read release", f"releases/{rev}/{name} is not JSON") from None
        return data if isinstance(data, dict) else None

    async def expected_answer(self, previous: str | None) -> str | None:
        """The previous release's gate answer, when it served the same model the same way."""
        assert self.release is not None
        if previous is None:
            return None
        old_release, old_gate = await self.read_release(previous), await self.read_release(previous, "gate.json")
        if old_release is None or old_gate is None:
            return None
        same = (old_release.get("model_key") == self.release.model_key
                and _dtype(old_release.get("serve_args", [])) == _dtype(list(self.release.serve_args))
                and bool(old_release.get("gpus")) == bool(self.release.gpus))
        return str(old_gate.get("answer")) if same else None

    async def record(self, rev: str) -> None:
        """Add ``rev`` to the host's history of releases that passed their gate, then remove the
        releases past the last :data:`KEEP_RELEASES` and the models and runtimes only they used
        (a failure there leaves them, with a warning: the host serves all the same)."""
        history = [r for r in self.state.get("history", []) if r != rev] + [rev]
        await self.node.write(self.paths.history, json.dumps(history[-20:]) + "\n", step="record history")
        self.state["history"] = history
        try:
            pruned = await agent(self.node, "prune", {"app": self.paths.app, "prefix": self.paths.prefix,
                                                      "keep": KEEP_RELEASES},
                                 python=self.python, step="remove old releases", timeout=300)
        except NodeCommandError as e:
            log.warning("%s: old releases were not removed: %s", self.node.host.name, e.message)
            return
        if pruned["releases"] or pruned["removed"]:
            log.info("%s: removed releases %s and %s", self.node.host.name, ", ".join(pruned["releases"]) or "none",
                     ", ".join(pruned["removed"]) or "no model or runtime")

    async def stop(self) -> None:
        """Stop and disable the unit (a first release that failed its gate)."""
        unit = shlex.quote(self.paths.unit)
        await self.run(f"systemctl disable --now --quiet {unit}", "stop")


def _dtype(args: list[str]) -> str | None:
    """The ``--dtype`` among serve options (``--dtype=X`` or ``--dtype X``), if any."""
    for i, arg in enumerate(args):
        if arg.startswith("--dtype="):
            return arg.split("=", 1)[1]
        if arg == "--dtype" and i + 1 < len(args):
            return args[i + 1]
    return None


def join_swarm(runs: list[HostRun]) -> None:
    """Make the hosts of ``runs`` that still need the model fetch it as one swarm: each is told
    the others' addresses (the ones the deployer reaches them at, on :data:`SWARM_PORT`)."""
    fetching = [r for r in runs if r.want.model_key not in r.state.get("models", [])]
    for run in fetching:
        run.swarm_peers = tuple(o.host.address for o in fetching if o is not run) if len(fetching) > 1 else ()


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
