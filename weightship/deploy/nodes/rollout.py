"""Rolling a deployment out to the nodes.

A rollout:
1. connects to every host (pinned host keys) and takes each host's lock (:mod:`.lock`);
2. preflight on every host before any change; a problem anywhere stops the rollout here;
3. prepares every host at once while the old release keeps serving: runtime, service user,
   model fetched and verified on the node, the key file, the release directory, and
   ``systemd-analyze verify`` of the unit as it will be loaded;
4. switches at most ``max_unavailable`` hosts at a time: drain and stop, switch ``current``,
   start, then the gate (``/ready``, then a greedy chat completion, compared with the previous
   release's answer when the model did not change). A host that fails the gate goes back to
   the release it ran before; once more than ``max_failures`` hosts failed no further host is
   touched. A host that cannot be reached is reported as unreachable and left as it is. A host
   left down keeps its place in the ``max_unavailable`` budget, and so does one that was down
   before the rollout.

A host already on the wanted release, active, whose release passed its gate, is not touched: a
second run with nothing changed restarts nothing, and a rerun after ``kill -9`` finishes the
hosts that were not done. The first Ctrl-C lets the hosts in flight finish (or go back); the
second abandons them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import logging
import shlex
import signal
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from weightship.deploy.nodes import preflight
from weightship.deploy.nodes.inventory import Host, Inventory
from weightship.deploy.nodes.layout import Paths, Release
from weightship.deploy.nodes.lock import HostLock
from weightship.deploy.nodes.ssh import Connections, connections
from weightship.deploy.nodes.steps import HostRun, join_swarm
from weightship.deploy.nodes.want import RuntimePlan, Want, plan_runtime
from weightship.errors import (
    DeployError,
    HostKeyError,
    NodesPreflightError,
    NodeUnreachableError,
    RolloutFailedError,
    UsageError,
)

log = logging.getLogger(__name__)

Say = Callable[[str, str], None]  # (host, message): progress for people
State = Literal["pending", "planned", "prepared", "unchanged", "updated", "rolled back", "failed", "unreachable",
                "not started"]
DOWN: tuple[State, ...] = ("failed",)  # a host in this state may be left stopped
FAILED: tuple[State, ...] = ("failed", "rolled back", "unreachable")


def _quiet(host: str, message: str) -> None:
    log.info("%s: %s", host, message)


def why(e: Exception) -> str:
    """What went wrong on a host, without the host's name (the table has it)."""
    if isinstance(e, DeployError):
        return str(getattr(e, "why", e.message))
    return f"internal error: {type(e).__name__}: {e}"


@dataclass
class HostResult:
    """One row of the results table."""

    host: str
    old: str | None = None
    new: str | None = None
    state: State = "pending"
    why: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_max_unavailable(value: str, hosts: int) -> int:
    """``N`` (at least 1) or ``P%`` of ``hosts`` (at least 1 host)."""
    try:
        n = int(hosts * float(value[:-1]) / 100) if value.endswith("%") else int(value)
    except ValueError:
        raise UsageError(f"--max-unavailable must be N or P%, got {value!r}") from None
    if (value.endswith("%") and not 0 < float(value[:-1]) <= 100) or (not value.endswith("%") and n < 1):
        raise UsageError(f"--max-unavailable must be at least 1 (or a percentage above 0), got {value!r}")
    return max(1, n)


class Rollout:
    """One command's work on a set of hosts of an inventory."""

    def __init__(self, inventory: Inventory, hosts: list[Host], want: Want, *, say: Say = _quiet,
                 runtime: RuntimePlan | None = None) -> None:
        self.inventory, self.hosts, self.want, self.say = inventory, hosts, want, say
        self.runtime = runtime or RuntimePlan("venv", None, None)
        self.paths = Paths(inventory.prefix, want.name)
        self.results = {h.name: HostResult(h.name) for h in hosts}
        self.runs: dict[str, HostRun] = {}
        self.locks: dict[str, HostLock] = {}
        self.stopping = False  # Ctrl-C: start no further host
        self.down_at_open: set[str] = set()

    # ---- connecting ---------------------------------------------------------------------------

    async def _open(self, pool: Connections, host: Host, lock: bool) -> None:
        node = await pool.node(host)
        if lock:
            held = HostLock(node, self.inventory.prefix, self.inventory.runtime.python)
            await held.acquire()
            self.locks[host.name] = held
        run = HostRun(node, self.inventory, self.paths, self.want, self.runtime)
        await run.read_state()
        self.runs[host.name] = run
        self.results[host.name].old = run.state.get("current")
        if run.state.get("current") and run.state.get("active") != "active":
            self.down_at_open.add(host.name)

    async def open(self, pool: Connections, *, lock: bool) -> None:
        """Connect to (and lock) every host. Host key problems stop everything, before any change."""
        outcomes = await asyncio.gather(*(self._open(pool, h, lock) for h in self.hosts), return_exceptions=True)
        for host, outcome in zip(self.hosts, outcomes, strict=True):
            if isinstance(outcome, HostKeyError):
                raise outcome
            if isinstance(outcome, Exception):
                self.fail(host.name, "unreachable" if isinstance(outcome, NodeUnreachableError) else "failed",
                          why(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome

    def close(self) -> None:
        for held in self.locks.values():
            held.release()

    def fail(self, host: str, state: State, reason: str) -> None:
        """Mark ``host``'s row as ``state`` because of ``reason``."""
        self.results[host].state, self.results[host].why = state, reason
        self.say(host, f"{state}: {reason}")

    def failures(self) -> list[str]:
        return [r.host for r in self.results.values() if r.state in FAILED]

    def pending(self) -> list[HostRun]:
        """The hosts still in the rollout, in inventory order."""
        return [self.runs[h.name] for h in self.hosts
                if h.name in self.runs and self.results[h.name].state == "pending"]

    async def _guard(self, host: str, work: Awaitable[None]) -> bool:
        """Run a host's ``work``; a failure lands in its row. True if it succeeded."""
        try:
            await work
            return True
        except NodeUnreachableError as e:
            self.fail(host, "unreachable", why(e))
        except Exception as e:  # one host's surprise must not stop the others mid-switch
            log.debug("%s", host, exc_info=True)
            self.fail(host, "failed", why(e))
        return False

    # ---- deploying ---------------------------------------------------------------------------

    async def preflight(self) -> None:
        """Check every host; raise :class:`NodesPreflightError` with every problem found."""
        problems: list[str] = []

        async def check(run: HostRun) -> None:
            for problem in preflight.problems(run, await run.facts()):
                problems.append(f"{run.host.name}: {problem}")

        await asyncio.gather(*(self._guard(run.host.name, check(run)) for run in self.pending()))
        if problems:
            raise NodesPreflightError(problems)

    async def prepare(self) -> None:
        """Stage the release on every pending host at once (the old release keeps serving)."""
        async def one(run: HostRun) -> None:
            self.say(run.host.name, "preparing (runtime, model, release) while the old release serves")
            release = await run.prepare()
            self.results[run.host.name].new = release.rev
            self.results[run.host.name].details = {"model": release.model_key, "runtime": release.runtime_version}

        join_swarm(self.pending())
        await asyncio.gather(*(self._guard(run.host.name, one(run)) for run in self.pending()))

    async def roll(self, limit: int, max_failures: int) -> None:
        """Switch the pending hosts, at most ``limit`` down at once. Hosts that were down before
        the rollout count: they go first, each holding a place while it is switched."""
        pending = sorted(self.pending(), key=lambda run: run.host.name not in self.down_at_open)
        if len(self.down_at_open) > limit:
            for run in pending:
                self.fail(run.host.name, "not started", f"{len(self.down_at_open)} host(s) were already down, "
                                                        f"more than --max-unavailable {limit}")
            return
        slots = asyncio.Semaphore(limit)

        async def one(run: HostRun) -> None:
            name = run.host.name
            await slots.acquire()
            if self.stopping or len(self.failures()) > max_failures:
                self.results[name].state = "not started"
                self.results[name].why = "interrupted" if self.stopping else "the rollout stopped"
                slots.release()
                return
            if name in self.locks and self.locks[name].lost:
                self.fail(name, "failed", "this host's lock was lost (its lease lapsed): not changed")
            else:
                await self._guard(name, self._switch(run))
            if self.results[name].state not in DOWN:  # a host left down keeps its place in the budget
                slots.release()

        await asyncio.gather(*(one(run) for run in pending))

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
        reason = await _switch_and_gate(run, rev, expect)
        if reason is None:
            await run.record(rev)
            row.state = "updated"
            self.say(name, f"on {rev}, gate passed")
            return
        self.say(name, f"gate failed: {reason}")
        row.why = reason
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
        """Per host: the release, model and runtime it has and would get, and the unit's diff."""
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
                "keys_change": run.want.key_mode == "credential" and run.state.get("keys_sha256") != run.keys_sha256,
                "unit_diff": diff})
        return rows

    def raise_if_failed(self) -> None:
        """Raise :class:`RolloutFailedError` with the table unless every host got its release."""
        left = [r.host for r in self.results.values() if r.state == "not started"]
        if self.failures() or self.stopping or left:
            names = self.failures() or (["interrupted"] if self.stopping else left)
            raise RolloutFailedError(names, [r.to_json() for r in self.results.values()])


async def _switch_and_gate(run: HostRun, rev: str, expect: str | None) -> str | None:
    """Switch ``run``'s host to ``rev`` and gate it: None if it serves, else why not. A step that
    fails on the node counts as a failed gate (the caller goes back); losing the node does not."""
    try:
        await run.switch(rev)
        return await run.gate(rev, expect)
    except NodeUnreachableError:
        raise
    except Exception as e:
        return why(e)


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


def run_rollout(rollout: Rollout, work: Callable[[Rollout], Awaitable[None]], *, lock: bool = True) -> None:
    """Open ``rollout``'s hosts, run ``work``, close; Ctrl-C once finishes the hosts in flight."""
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def interrupted() -> None:
            if rollout.stopping:
                task.cancel()
                return
            rollout.stopping = True
            rollout.say("rollout", "interrupted: finishing the hosts in flight (Ctrl-C again to abandon them)")

        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signal.SIGINT, interrupted)
        async with connections(rollout.inventory) as pool:
            try:
                await rollout.open(pool, lock=lock)
                await work(rollout)
            finally:
                rollout.close()

    asyncio.run(main())


def plan(inventory: Inventory, hosts: list[Host], want: Want, *, say: Say = _quiet) -> list[dict[str, Any]]:
    """What a rollout of ``want`` would change on each host (changes nothing, takes no lock)."""
    rollout = Rollout(inventory, hosts, want, say=say, runtime=plan_runtime(inventory))

    async def work(r: Rollout) -> None:
        await _planned(r)

    run_rollout(rollout, work, lock=False)
    if rollout.failures():
        rollout.raise_if_failed()
    return rollout.plan()


def deploy(inventory: Inventory, hosts: list[Host], want: Want, *, max_unavailable: str = "1",
           max_failures: int = 0, prepare_only: bool = False, say: Say = _quiet) -> list[HostResult]:
    """Roll ``want`` out to ``hosts``; returns the per-host rows.

    Raises :class:`RolloutFailedError` carrying the rows when a host failed.
    """
    limit = parse_max_unavailable(max_unavailable, len(hosts))
    rollout = Rollout(inventory, hosts, want, say=say, runtime=plan_runtime(inventory))

    async def work(r: Rollout) -> None:
        for stage, stopped in ((None, "could not start on every host"), (r.preflight, "a host failed preflight"),
                               (r.prepare, "a host failed to prepare; nothing was switched")):
            if stage is not None:
                await stage()
            if len(r.failures()) > max_failures:
                for run in r.pending():
                    r.results[run.host.name].state, r.results[run.host.name].why = "not started", stopped
                return
        if prepare_only:
            for run in r.pending():
                r.results[run.host.name].state = "prepared"
            return
        await r.roll(limit, max_failures)

    run_rollout(rollout, work)
    rollout.raise_if_failed()
    return list(rollout.results.values())


def release_of(data: dict[str, Any]) -> Release:
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
