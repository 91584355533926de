"""Rolling a deployment out to the nodes, and the commands that look after it afterwards.

A rollout:
1. connects to every host (pinned host keys) and takes each host's lock (``flock`` held by the
   SSH session: a ``kill -9`` of the deployer drops the connection and with it the lock);
2. preflight on every host before any change; one problem anywhere stops the rollout here;
3. prepares every host at once while the old release keeps serving: runtime, service user,
   model fetched and verified on the node, the release directory;
4. switches at most ``max_unavailable`` hosts at a time: drain and stop, switch ``current``,
   start, then the gate (``/ready``, then a greedy chat completion, compared with the previous
   release's answer when the model did not change). A host that fails the gate goes back to
   its previous release; once more than ``max_failures`` hosts failed no further host is
   touched. A host that cannot be reached is reported as unreachable and left as it is.

A host already on the wanted release, active, whose release passed its gate, is not touched: a
second run with nothing changed restarts nothing, and a rerun after ``kill -9`` finishes the
hosts that were not done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import logging
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncssh

from weightship.deploy.nodes.inventory import Host, Inventory
from weightship.deploy.nodes.layout import Paths, Release
from weightship.deploy.nodes.ssh import Connections, Node, connections
from weightship.deploy.nodes.steps import HostRun, RuntimePlan, Want, agent, plan_runtime
from weightship.errors import (
    DeployError,
    HostKeyError,
    NodeCommandError,
    NodeLockedError,
    NodesPreflightError,
    NodeUnreachableError,
    RolloutFailedError,
    UsageError,
)

log = logging.getLogger(__name__)

Say = Callable[[str, str], None]  # (host, message): progress for people


def _quiet(host: str, message: str) -> None:
    log.info("%s: %s", host, message)


@dataclass
class HostResult:
    """One row of the results table."""

    host: str
    old: str | None = None
    new: str | None = None
    state: str = "pending"  # unchanged|updated|prepared|rolled back|failed|unreachable|not started|planned
    why: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def max_unavailable(value: str, hosts: int) -> int:
    """``N`` or ``P%`` of ``hosts`` (at least 1)."""
    try:
        n = int(hosts * float(value[:-1]) / 100) if value.endswith("%") else int(value)
    except ValueError:
        raise UsageError(f"--max-unavailable must be N or P%, got {value!r}") from None
    if n < 0 or (value.endswith("%") and not 0 < float(value[:-1]) <= 100):
        raise UsageError(f"--max-unavailable must be positive, got {value!r}")
    return max(1, n)


LOCK_LEASE_S = 30  # a lock whose holder has not been heard from for this long is let go
_LOCK_HOLDER = ("import select, sys\n"
                "print('locked', flush=True)\n"
                f"while select.select([sys.stdin], [], [], {LOCK_LEASE_S})[0] and sys.stdin.readline():\n"
                "    pass\n")


class _Lock:
    """The node's rollout lock: ``flock`` held by a process on the node that lives while we do.

    The holder exits when our SSH channel closes (a ``kill -9`` of the deployer closes its
    connection) or when no heartbeat came for ``LOCK_LEASE_S`` (a network cut), so a lock is never
    left behind.
    """

    def __init__(self, node: Node, path: str, python: str) -> None:
        self.node, self.path, self.python = node, path, python
        self.process: asyncssh.SSHClientProcess[str] | None = None
        self._beat: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        lock = shlex.quote(self.path)
        holder = f"{shlex.quote(self.python)} -c {shlex.quote(_LOCK_HOLDER)}"
        command = self.node.wrap(f"mkdir -p $(dirname {lock}) && exec flock -n -E 75 {lock} {holder}")
        try:
            self.process = await self.node.conn.create_process(command)
            line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            raise NodeUnreachableError(self.node.host.name, f"taking the lock: {e}") from None
        if line.strip() != "locked":
            code = (await self.process.wait()).exit_status
            if code == 75:
                raise NodeLockedError(self.node.host.name)
            raise NodeCommandError(self.node.host.name, "lock", f"flock exited {code}")
        self._beat = asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self) -> None:
        assert self.process is not None
        with contextlib.suppress(OSError, asyncssh.Error):
            while True:
                await asyncio.sleep(LOCK_LEASE_S / 3)
                self.process.stdin.write("\n")

    def release(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self.process is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.process.stdin.write_eof()


class Rollout:
    """One command's work on a set of hosts of an inventory."""

    def __init__(self, inventory: Inventory, hosts: list[Host], want: Want, *, say: Say = _quiet,
                 runtime: RuntimePlan | None = None) -> None:
        self.inventory, self.hosts, self.want, self.say = inventory, hosts, want, say
        self.runtime = runtime or RuntimePlan("venv", None, None)
        self.paths = Paths(inventory.prefix, want.name)
        self.results = {h.name: HostResult(h.name) for h in hosts}
        self.runs: dict[str, HostRun] = {}
        self._locks: list[_Lock] = []

    # ---- connecting ---------------------------------------------------------------------------

    async def _open(self, pool: Connections, host: Host, lock: bool) -> None:
        node = await pool.node(host)
        if lock:
            held = _Lock(node, self.paths.lock, self.inventory.runtime.python)
            await held.acquire()
            self._locks.append(held)
        run = HostRun(node, self.inventory, self.paths, self.want, self.runtime)
        await run.read_state()
        self.runs[host.name] = run
        self.results[host.name].old = run.state.get("current")

    async def open(self, pool: Connections, *, lock: bool) -> None:
        """Connect to (and lock) every host. Host key problems stop everything, before any change."""
        outcomes = await asyncio.gather(*(self._open(pool, h, lock) for h in self.hosts), return_exceptions=True)
        for host, outcome in zip(self.hosts, outcomes, strict=True):
            if isinstance(outcome, HostKeyError):
                raise outcome
            if isinstance(outcome, NodeUnreachableError):
                self._fail(host.name, "unreachable", outcome.message.split(": ", 1)[-1])
            elif isinstance(outcome, DeployError):
                self._fail(host.name, "failed", outcome.message.split(": ", 1)[-1])
            elif isinstance(outcome, BaseException):
                raise outcome

    def close(self) -> None:
        for held in self._locks:
            held.release()

    def _fail(self, host: str, state: str, why: str) -> None:
        self.results[host].state, self.results[host].why = state, why
        self.say(host, f"{state}: {why}")

    def failures(self) -> list[str]:
        return [r.host for r in self.results.values() if r.state in ("failed", "rolled back", "unreachable")]

    async def _guard(self, host: str, work: Any) -> bool:
        """Run a host's coroutine ``work``; failures land in its row. True if it succeeded."""
        try:
            await work
            return True
        except NodeUnreachableError as e:
            self._fail(host, "unreachable", e.message.split(": ", 1)[-1])
        except DeployError as e:
            self._fail(host, "failed", e.message.split(": ", 1)[-1])
        return False

    # ---- deploying ---------------------------------------------------------------------------

    async def preflight(self) -> None:
        problems: list[str] = []

        async def check(run: HostRun) -> None:
            for problem in run.preflight_problems(await run.facts()):
                problems.append(f"{run.host.name}: {problem}")

        await asyncio.gather(*(self._guard(name, check(run)) for name, run in self.runs.items()))
        if problems:
            raise NodesPreflightError(problems)

    async def prepare(self) -> None:
        async def one(run: HostRun) -> None:
            self.say(run.host.name, "preparing (runtime, model, release) while the old release serves")
            release = await run.prepare()
            self.results[run.host.name].new = release.rev
            self.results[run.host.name].details = {"model": release.model_key, "runtime": release.runtime_version}

        await asyncio.gather(*(self._guard(name, one(run)) for name, run in self.runs.items()))

    async def roll(self, limit: int, max_failures: int) -> None:
        slots = asyncio.Semaphore(limit)
        order = [h.name for h in self.hosts if h.name in self.runs and self.results[h.name].state == "pending"]

        async def one(name: str) -> None:
            async with slots:
                if len(self.failures()) > max_failures:
                    self.results[name].state = "not started"
                    self.results[name].why = "the rollout stopped"
                    return
                await self._guard(name, self._switch(self.runs[name]))

        await asyncio.gather(*(one(name) for name in order))

    async def _switch(self, run: HostRun) -> None:
        assert run.release is not None
        name, rev, row = run.host.name, run.release.rev, self.results[run.host.name]
        if run.unchanged():
            row.state = "unchanged"
            self.say(name, f"already on {rev}")
            return
        previous = run.previous()
        expect = await run.expected_answer(previous)
        self.say(name, f"switching {previous or '(none)'} -> {rev}")
        why = await _switch_and_gate(run, rev, expect)
        if why is None:
            await run.record(rev)
            row.state = "updated"
            self.say(name, f"on {rev}, gate passed")
            return
        self.say(name, f"gate failed: {why}")
        row.why = why
        if previous is None:
            await run.stop()
            row.state = "failed"
            return
        back = await _switch_and_gate(run, previous, None)
        row.state = "rolled back" if back is None else "failed"
        if back is not None:
            row.why += f"; the previous release {previous} did not come back either: {back}"
        self.say(name, f"back on {previous}" if back is None else "previous release did not come back")

    # ---- reporting ---------------------------------------------------------------------------

    def plan(self) -> list[dict[str, Any]]:
        rows = []
        for name, run in ((h.name, self.runs[h.name]) for h in self.hosts if h.name in self.runs):
            assert run.release is not None
            old_unit = run.state.get("unit_text") or ""
            diff = "".join(difflib.unified_diff(old_unit.splitlines(True), run.unit_text.splitlines(True),
                                                run.paths.unit_path + " (node)", run.paths.unit_path + " (new)"))
            old_release = run.state.get("release") or {}
            runtime_present = self.runtime.kind == "venv" or self.runtime.key in run.state.get("runtimes", [])
            rows.append({
                "host": name, "release": {"old": run.state.get("current"), "new": run.release.rev},
                "action": "none" if run.unchanged() else "update",
                "model": {"old": old_release.get("model_key"), "new": run.release.model_key,
                          "present": run.release.model_key in run.state.get("models", [])},
                "runtime": {"old": old_release.get("runtime_version"), "new": run.release.runtime_version,
                            "present": runtime_present},
                "unit_diff": diff})
        return rows


async def _switch_and_gate(run: HostRun, rev: str, expect: str | None) -> str | None:
    """Switch ``run``'s host to ``rev`` and gate it: None if it serves, else why not. A step that
    fails on the node counts as a failed gate (the caller rolls back); losing the node does not."""
    try:
        await run.switch(rev)
        return await run.gate(rev, expect)
    except NodeUnreachableError:
        raise
    except DeployError as e:
        return e.message.split(": ", 1)[-1]


async def _planned(rollout: Rollout) -> None:
    """Fill each run's wanted release without changing the node (the plan's view)."""
    for run in rollout.runs.values():
        directory = rollout.runtime.directory(rollout.inventory)
        version = rollout.runtime.version
        if rollout.runtime.kind == "venv":
            done = await run.node.run(f"{shlex.quote(directory)}/bin/weightship --version", step="runtime",
                                      timeout=120, check=False)
            version = done.stdout.split()[-1] if done.code == 0 and done.stdout.split() else "missing"
        run.desired(directory, version or "latest")


def deploy(inventory: Inventory, hosts: list[Host], want: Want, *, max_unavailable_: str = "1",
           max_failures: int = 0, plan_only: bool = False, prepare_only: bool = False,
           say: Say = _quiet) -> tuple[list[HostResult], list[dict[str, Any]]]:
    """Roll ``want`` out to ``hosts``; returns the per-host rows (and the plan, when asked for).

    Raises :class:`RolloutFailedError` carrying the rows when a host failed.
    """
    limit = max_unavailable(max_unavailable_, len(hosts))
    runtime = plan_runtime(inventory)

    async def main() -> tuple[list[HostResult], list[dict[str, Any]]]:
        rollout = Rollout(inventory, hosts, want, say=say, runtime=runtime)
        async with connections(inventory) as pool:
            try:
                await rollout.open(pool, lock=not plan_only)
                if rollout.failures() and len(rollout.failures()) > max_failures:
                    return _stopped(rollout, "could not start on every host")
                if plan_only:
                    await _planned(rollout)
                    for row in rollout.results.values():
                        row.state = "planned"
                    return list(rollout.results.values()), rollout.plan()
                await rollout.preflight()
                await rollout.prepare()
                if len(rollout.failures()) > max_failures:
                    return _stopped(rollout, "a host failed to prepare; nothing was switched")
                if prepare_only:
                    for row in rollout.results.values():
                        if row.state == "pending":
                            row.state = "prepared"
                    return list(rollout.results.values()), []
                await rollout.roll(limit, max_failures)
            finally:
                rollout.close()
        if rollout.failures():
            raise RolloutFailedError(rollout.failures(), [r.to_json() for r in rollout.results.values()])
        return list(rollout.results.values()), []

    return asyncio.run(main())


def _stopped(rollout: Rollout, why: str) -> tuple[list[HostResult], list[dict[str, Any]]]:
    for row in rollout.results.values():
        if row.state == "pending":
            row.state, row.why = "not started", why
    raise RolloutFailedError(rollout.failures(), [r.to_json() for r in rollout.results.values()])


# ---- after a rollout: status, rollback, uninstall, logs ------------------------------------------


def status(inventory: Inventory, hosts: list[Host], name: str, *, verify: bool = True) -> list[dict[str, Any]]:
    """Per host: reachable, unit state, release, model (and whether it verifies), /ready, GPUs."""
    want = Want(name=name, model="")

    async def one(pool: Connections, host: Host) -> dict[str, Any]:
        row: dict[str, Any] = {"host": host.name, "address": host.address, "reachable": False}
        try:
            node = await pool.node(host)
            run = HostRun(node, inventory, Paths(inventory.prefix, name), want, RuntimePlan("venv", None, None))
            state = await run.read_state()
            release = state.get("release") or {}
            row.update(reachable=True, unit=f"{state.get('active')} ({state.get('sub')})",
                       release=state.get("current"), model=release.get("model_key"),
                       runtime=release.get("runtime_version"), port=release.get("port"), ready=False,
                       verified=None, gpus=None)
            facts = await run.facts()
            row["gpus"] = facts["gpus"]
            if release:
                row["ready"] = (await agent(node, "ready", {"port": release["port"]}, python=run.python,
                                            step="ready", timeout=30))["ready"]
                if verify:
                    model = f"{run.paths.models}/{release['model_key']}"
                    done = await node.run(f"{shlex.quote(release['runtime'])}/bin/weightship verify "
                                          f"{shlex.quote(model)}", step="verify", timeout=3600, check=False)
                    row["verified"] = done.code == 0
        except HostKeyError:
            raise
        except NodeUnreachableError as e:
            row["why"] = e.message.split(": ", 1)[-1]
        except DeployError as e:
            row["why"] = e.message
        return row

    async def main() -> list[dict[str, Any]]:
        async with connections(inventory) as pool:
            return list(await asyncio.gather(*(one(pool, h) for h in hosts)))

    return asyncio.run(main())


def rollback(inventory: Inventory, hosts: list[Host], name: str, *, max_unavailable_: str = "1",
             max_failures: int = 0, gate_timeout: float = 900.0, say: Say = _quiet) -> list[HostResult]:
    """Return every host to the release before its current one, rolling and gated."""
    def older(state: dict[str, Any]) -> str | None:
        return next((r for r in reversed(state.get("history", [])) if r != state.get("current")), None)

    return _return_to(inventory, hosts, name, older, "no earlier release to go back to",
                      max_unavailable_=max_unavailable_, max_failures=max_failures, gate_timeout=gate_timeout,
                      say=say)


def restart(inventory: Inventory, hosts: list[Host], name: str, *, max_unavailable_: str = "1",
            gate_timeout: float = 900.0, say: Say = _quiet) -> list[HostResult]:
    """Start every host's current release again (after a pause), rolling and gated."""
    return _return_to(inventory, hosts, name, lambda state: state.get("current"), "no release to start",
                      max_unavailable_=max_unavailable_, max_failures=0, gate_timeout=gate_timeout, say=say)


def _return_to(inventory: Inventory, hosts: list[Host], name: str, pick: Callable[[dict[str, Any]], str | None],
               none: str, *, max_unavailable_: str, max_failures: int, gate_timeout: float,
               say: Say) -> list[HostResult]:
    """Switch every host to the release ``pick`` chooses from its state, as a rollout does."""
    limit = max_unavailable(max_unavailable_, len(hosts))

    async def main() -> list[HostResult]:
        rollout = Rollout(inventory, hosts, Want(name=name, model="", gate_timeout=gate_timeout), say=say)
        async with connections(inventory) as pool:
            try:
                await rollout.open(pool, lock=True)
                for host, run in rollout.runs.items():
                    target = pick(run.state)
                    release = await run.read_release(target) if target else None
                    if release is None:
                        rollout._fail(host, "failed", none)
                        continue
                    run.want = Want(name=name, model=release["model_ref"], port=release["port"],
                                    gate_timeout=gate_timeout)
                    run.unit_text = ""  # never "unchanged": even the current release is restarted
                    run.release = _release_of(release)
                if len(rollout.failures()) <= max_failures:
                    await rollout.roll(limit, max_failures)
            finally:
                rollout.close()
        if rollout.failures():
            raise RolloutFailedError(rollout.failures(), [r.to_json() for r in rollout.results.values()])
        return list(rollout.results.values())

    return asyncio.run(main())


def _release_of(data: dict[str, Any]) -> Release:
    """The release a ``release.json`` describes (refused if it does not name itself)."""
    known = {f.name for f in dataclasses.fields(Release)}
    fields = {k: v for k, v in data.items() if k in known}
    fields["gpus"], fields["serve_args"] = tuple(fields.get("gpus", ())), tuple(fields.get("serve_args", ()))
    try:
        release = Release(**fields)
    except TypeError as e:
        raise DeployError(f"release {data.get('rev')} was written by another weightship version: {e}") from None
    if release.rev != data.get("rev"):
        raise DeployError(f"release {data.get('rev')} was written by another weightship version",
                          hint="roll out again with this version instead")
    return release


def uninstall(inventory: Inventory, hosts: list[Host], name: str, *, purge: bool = False,
              say: Say = _quiet) -> list[dict[str, Any]]:
    """Remove the unit, the releases and the service user (the model cache too with ``purge``)."""
    paths = Paths(inventory.prefix, name)

    async def one(pool: Connections, host: Host) -> dict[str, Any]:
        node = await pool.node(host)
        lock = _Lock(node, paths.lock, inventory.runtime.python)
        await lock.acquire()
        try:
            run = HostRun(node, inventory, paths, Want(name=name, model=""), RuntimePlan("venv", None, None))
            state = await run.read_state()
            models = set()
            if purge:
                out = await run.run(f"cat {shlex.quote(paths.releases)}/*/release.json 2>/dev/null | "
                                    "sed -n 's/.*\"model_key\": \"\\(.*\\)\".*/\\1/p'", "read releases")
                models = set(out.split())
            unit = shlex.quote(paths.unit)
            await run.run(f"systemctl disable --now --quiet {unit} 2>/dev/null; rm -f {shlex.quote(paths.unit_path)} "
                          f"&& systemctl daemon-reload && systemctl reset-failed {unit} 2>/dev/null; "
                          f"rm -rf {shlex.quote(paths.app)} /var/lib/weightship/{shlex.quote(name)}; "
                          f"id -u {shlex.quote(paths.user)} >/dev/null 2>&1 && userdel {shlex.quote(paths.user)}; true",
                          "uninstall")
            removed = []
            for key in sorted(models):
                users = await run.run(f"grep -l '\"model_key\": \"{key}\"' {shlex.quote(paths.prefix)}/apps/*/releases/"
                                      "*/release.json 2>/dev/null; true", "check model use")
                if not users.strip():
                    await run.run(f"rm -rf {shlex.quote(paths.models)}/{shlex.quote(key)}", "purge model")
                    removed.append(key)
            say(host.name, f"uninstalled {name}" + (f", removed models {', '.join(removed)}" if removed else ""))
            return {"host": host.name, "removed": True, "was": state.get("current"), "models_removed": removed}
        finally:
            lock.release()

    async def main() -> list[dict[str, Any]]:
        async with connections(inventory) as pool:
            return list(await asyncio.gather(*(one(pool, h) for h in hosts)))

    return asyncio.run(main())


def logs(inventory: Inventory, hosts: list[Host], name: str, *, lines: int = 50) -> dict[str, str]:
    """The unit's recent journal on each host."""
    unit = Paths(inventory.prefix, name).unit
    if lines < 1:
        raise UsageError("--lines must be at least 1")

    async def one(pool: Connections, host: Host) -> tuple[str, str]:
        node = await pool.node(host)
        done = await node.run(f"journalctl -u {shlex.quote(unit)} -n {lines} --no-pager -o short-iso",
                              step="logs", timeout=60)
        return host.name, done.stdout

    async def main() -> dict[str, str]:
        async with connections(inventory) as pool:
            return dict(await asyncio.gather(*(one(pool, h) for h in hosts)))

    return asyncio.run(main())
