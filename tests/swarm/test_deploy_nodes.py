"""``deploy nodes`` fetches the model on the hosts of a rollout as one swarm: each host that
still needs the model is told the others (the addresses the deployer reaches them at) and
serves them while it fetches. The rollout on real systemd nodes is tests/deploy/nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from weightship.deploy.nodes import steps
from weightship.deploy.nodes.inventory import load
from weightship.deploy.nodes.layout import Paths
from weightship.deploy.nodes.steps import SWARM_PORT, HostRun, join_swarm
from weightship.deploy.nodes.want import RuntimePlan, Want


def _inventory(tmp_path: Path) -> Any:
    (tmp_path / "known_hosts").write_text("")
    doc = {"known_hosts": "known_hosts", "runtime": {"venv": "/opt/venv"},
           "hosts": {"a": {"address": "10.0.0.1"}, "b": {"address": "10.0.0.2"},
                     "c": {"address": "fd00::3"}, "d": {"address": "10.0.0.4"}}}
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(doc))
    return load(tmp_path / "nodes.yaml")


def _runs(tmp_path: Path) -> list[HostRun]:
    inv = _inventory(tmp_path)
    want = Want(name="m", model="hf://acme/m")
    runs = []
    for name, host in inv.hosts.items():
        run = HostRun(SimpleNamespace(host=host), inv, Paths(inv.prefix, "m"), want,  # type: ignore[arg-type]
                      RuntimePlan("venv", None, None))
        run.state = {"models": [want.model_key] if name == "d" else []}  # d has it already
        runs.append(run)
    return runs


def test_the_hosts_that_fetch_are_one_swarm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _runs(tmp_path)
    join_swarm(runs)
    a, b, c, d = runs
    assert b.swarm_peers == ("10.0.0.1", "fd00::3")
    assert a.swarm_peers == ("10.0.0.2", "fd00::3") and c.swarm_peers == ("10.0.0.1", "10.0.0.2")
    assert d.swarm_peers == ()  # it fetches nothing, so it is no one's peer either

    sent: dict[str, Any] = {}

    async def agent(node: object, verb: str, args: dict[str, Any], **kw: object) -> dict[str, Any]:
        sent.update(args)
        return {"ok": True, "result": {}}

    async def run(self: HostRun, command: str, step: str, timeout: float | None = None, **kw: object) -> str:
        return ""

    monkeypatch.setattr(steps, "agent", agent)
    monkeypatch.setattr(HostRun, "run", run)
    asyncio.run(c.ensure_model("/opt/venv"))
    args = sent["args"]
    assert args[args.index("--listen") + 1] == f"0.0.0.0:{SWARM_PORT}"
    assert [args[i + 1] for i, x in enumerate(args) if x == "--peer"] == [f"10.0.0.1:{SWARM_PORT}",
                                                                          f"10.0.0.2:{SWARM_PORT}"]
    assert "--seed-for" in args


def test_a_lone_host_fetches_alone(tmp_path: Path) -> None:
    runs = _runs(tmp_path)[:1]
    join_swarm(runs)
    assert runs[0].swarm_peers == ()
