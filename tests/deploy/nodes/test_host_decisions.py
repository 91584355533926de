"""One host's decisions (preflight, which release to go back to, whether anything changed, which
answer the gate expects), on what a node reports, without a node: a stand-in answers the few
reads they make."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from weightship.deploy.nodes import preflight
from weightship.deploy.nodes.inventory import Host, Inventory, Runtime
from weightship.deploy.nodes.layout import Paths
from weightship.deploy.nodes.ssh import Completed
from weightship.deploy.nodes.steps import HostRun
from weightship.deploy.nodes.want import RuntimePlan, Want

KEYS = "sk-one\n"


class FileNode:
    """Answers ``cat PATH`` from ``files``, as a node's shell would."""

    def __init__(self, files: dict[str, str]) -> None:
        self.host = Host(name="gpu1", address="10.0.0.1", gpus=1)
        self.files = files

    async def run(self, command: str, *, step: str, timeout: float, input: str | None = None,
                  check: bool = True) -> Completed:
        path = command.removeprefix("cat ").strip("'")
        text = self.files.get(path)
        return Completed(0, text, "") if text is not None else Completed(1, "", "No such file")


def host_run(files: dict[str, str] | None = None, **want: Any) -> HostRun:
    inventory = Inventory(path=Path("nodes.yaml"), hosts={}, groups={}, known_hosts=Path("known_hosts"),
                          runtime=Runtime(venv="/opt/venv"))
    run = HostRun(FileNode(files or {}), inventory, Paths("/opt/weightship", "tiny"),  # type: ignore[arg-type]
                  Want(name="tiny", model="weightship-tiny", api_keys=KEYS, model_bytes=14 << 30, **want),
                  RuntimePlan("venv", None, None))
    run.desired("/opt/venv", "0.1.0")
    return run


FACTS: dict[str, Any] = {"systemd": True, "systemd_version": 252, "prefix_owners": [], "python": [3, 11, 2],
                         "free_bytes": 100 << 30, "free_at": "/", "prefix_traversable": True, "port_busy": False,
                         "unit_active": False, "gpus": [{"index": 0, "total_mib": 81559, "used_mib": 3}],
                         "flock": True, "useradd": True}


@pytest.mark.parametrize(("change", "problem"), [
    ({"systemd_version": 245}, "systemd 245 is too old"),
    ({"prefix_owners": ["/opt"]}, "/opt can be changed by users other than root"),
    ({"free_bytes": 10 << 30}, "bytes free"),
    ({"port_busy": True}, "port 8000 is in use"),
    ({"gpus": None}, "nvidia-smi is not installed"),
    ({"gpus": []}, "1 GPU(s) asked for, 0 present"),
    ({"gpus": [{"index": 0, "total_mib": 24576, "used_mib": 20000}]}, "GPU 0: 4576 MiB free"),
    ({"prefix_traversable": False}, "not searchable"),
])
def test_preflight_names_what_stops_the_host(change: dict[str, Any], problem: str) -> None:
    run = host_run()
    assert preflight.problems(run, FACTS) == []
    problems = preflight.problems(run, {**FACTS, **change})
    assert len(problems) == 1 and problem in problems[0], problems


def test_the_port_of_the_running_release_is_not_busy_for_its_own_redeploy() -> None:
    run = host_run()
    run.state = {"release": {"port": 8000}}
    assert preflight.problems(run, {**FACTS, "port_busy": True, "unit_active": True}) == []


def test_going_back_means_what_the_host_was_serving() -> None:
    run = host_run()
    assert run.release is not None
    wanted = run.release.rev
    # Killed after X passed its gate, before it was recorded: the host serves X, not W.
    run.state = {"current": "X", "release": {"port": 8000}, "history": ["W"]}
    assert run.previous() == "X"
    # Killed mid-switch to the wanted release: go back to the newest other release that passed.
    run.state = {"current": wanted, "release": {"port": 8000}, "history": ["W", "X"]}
    assert run.previous() == "X"
    run.state = {}
    assert run.previous() is None


def test_nothing_changed_only_when_release_unit_keys_and_health_all_match() -> None:
    run = host_run()
    assert run.release is not None
    same = {"current": run.release.rev, "unit_text": run.unit_text, "active": "active",
            "history": [run.release.rev], "keys_sha256": hashlib.sha256(KEYS.encode()).hexdigest()}
    run.state = same
    assert run.unchanged()
    for change in ({"keys_sha256": "0" * 64}, {"active": "failed"}, {"history": []}, {"unit_text": "old"},
                   {"current": "other"}):
        run.state = {**same, **change}
        assert not run.unchanged(), change


@pytest.mark.parametrize(("old_args", "new_args", "expected"), [
    ([], (), "blue, red, green"),
    (["--max-batch=4"], ("--max-batch=8",), "blue, red, green"),  # same model, same numbers
    (["--dtype=float16"], (), None),  # another dtype may answer otherwise
    ([], ("--dtype", "bfloat16"), None),
])
def test_the_gate_expects_the_previous_answer_only_for_the_same_model_served_alike(
        old_args: list[str], new_args: tuple[str, ...], expected: str | None) -> None:
    run = host_run(serve_args=new_args)
    assert run.release is not None
    old = Paths("/opt/weightship", "tiny").release("OLD")
    files = {f"{old}/release.json": json.dumps({"model_key": run.release.model_key, "serve_args": old_args,
                                                 "gpus": list(run.release.gpus)}),
             f"{old}/gate.json": json.dumps({"answer": "blue, red, green"})}
    run.node = FileNode(files)  # type: ignore[assignment]
    assert asyncio.run(run.expected_answer("OLD")) == expected
    assert asyncio.run(run.expected_answer(None)) is None


def test_old_releases_go_with_what_only_they_used(tmp_path: Path) -> None:
    """The node agent's prune, on a real directory tree: releases past current and the last
    KEEP_RELEASES of the history go, and so do the models and runtimes that only they used; a
    model another deployment uses, an uninstalled deployment's kept cache and a venv outside the
    prefix stay."""
    from weightship.deploy.nodes import agent
    from weightship.deploy.nodes.steps import KEEP_RELEASES

    prefix = tmp_path / "opt"
    for d in ("models/m1", "models/m2", "models/m3", "models/kept-cache", "runtimes/v1", "runtimes/v2"):
        (prefix / d).mkdir(parents=True)
        (prefix / d / "file").write_text(d)
    (tmp_path / "venv").mkdir()

    def release(app: str, rev: str, model: str, runtime: str) -> None:
        rel = prefix / "apps" / app / "releases" / rev
        rel.mkdir(parents=True)
        (rel / "model").symlink_to(prefix / "models" / model)
        (rel / "runtime").symlink_to(runtime if runtime.startswith("/") else prefix / "runtimes" / runtime)

    release("a", "r1", "m1", "v1")
    release("a", "r2", "m2", "v1")
    release("a", "r3", "m2", str(tmp_path / "venv"))
    release("a", "r4", "m3", "v2")
    release("a", "r5", "m3", "v2")  # prepared, failed its gate: not in the history
    release("b", "s1", "m1", "v1")  # another deployment still on m1 and v1
    (prefix / "apps/a/releases/r6.tmp-weightship").mkdir()  # a release being written
    (prefix / "apps/a/history.json").write_text(json.dumps(["r1", "r2", "r3", "r4", "r3"]))
    (prefix / "apps/a/current").symlink_to("releases/r3")

    result = agent.prune({"app": str(prefix / "apps/a"), "prefix": str(prefix), "keep": KEEP_RELEASES})

    assert sorted(p.name for p in (prefix / "apps/a/releases").iterdir()) == ["r3", "r4", "r6.tmp-weightship"]
    assert sorted(result["releases"]) == ["r1", "r2", "r5"]
    assert sorted(p.name for p in (prefix / "models").iterdir()) == ["kept-cache", "m1", "m2", "m3"]  # r3 uses m2
    assert sorted(p.name for p in (prefix / "runtimes").iterdir()) == ["v1", "v2"]  # b's s1 uses v1
    assert result["removed"] == [] and (tmp_path / "venv").is_dir()

    (prefix / "apps/b/releases/s1/model").unlink()  # b moved on to m3 (its release is rewritten)
    (prefix / "apps/b/releases/s1/model").symlink_to(prefix / "models/m3")
    (prefix / "apps/a/history.json").write_text(json.dumps(["r3", "r4"]))
    (prefix / "apps/a/current").unlink()
    (prefix / "apps/a/current").symlink_to("releases/r4")
    release("a", "r0", "m1", "v1")  # an older release that used m1, now used by no one
    result = agent.prune({"app": str(prefix / "apps/a"), "prefix": str(prefix), "keep": 1})
    assert result["releases"] == ["r0", "r3"]
    assert sorted(p.name for p in (prefix / "models").iterdir()) == ["kept-cache", "m3"]
    assert result["removed"] == [str(prefix.resolve() / "models/m1"), str(prefix.resolve() / "models/m2")]
    assert (prefix / "runtimes/v1").is_dir()  # b's s1 still runs on v1
