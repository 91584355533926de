"""``weightship nodes``: pin host keys, and look after a deployment on on-prem nodes
(``weightship deploy nodes`` rolls one out)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from weightship.cli._common import JsonOption, emit, state, stderr

app = typer.Typer(help="On-prem nodes over SSH: trust host keys, and show, roll back, remove or read "
                       "the logs of a deployment (`weightship deploy nodes` rolls one out).",
                  no_args_is_help=True)

InventoryOpt = Annotated[Path, typer.Option("--inventory", "-i", help="The nodes inventory (nodes.yaml).")]
NameOpt = Annotated[str, typer.Option("--name", help="Deployment name (as given to `deploy nodes`).")]
GroupOpt = Annotated[str | None, typer.Option("--group", "-g", help="Only this group's hosts.")]
HostsOpt = Annotated[str | None, typer.Option("--hosts", help="Only these hosts (comma-separated).")]


def select(inventory_path: Path, group: str | None, hosts: str | None) -> tuple[Any, list[Any]]:
    """The inventory and the hosts a command acts on."""
    from weightship.deploy.nodes.inventory import load

    inventory = load(inventory_path)
    names = [h.strip() for h in hosts.split(",") if h.strip()] if hosts else None
    return inventory, inventory.select(group=group, hosts=names)


def say(host: str, message: str) -> None:
    """Progress for people, on stderr (silent with --quiet or --json)."""
    if not state().quiet and not state().json:
        stderr.print(f"{host}: {message}", highlight=False, markup=False)


def results_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("host", "release (old → new)", "state", "why")
    for r in rows:
        table.add_row(r["host"], f"{r.get('old') or '-'} → {r.get('new') or '-'}", r["state"], r.get("why") or "")
    return table


@app.command("trust")
def trust(
    hosts: Annotated[list[str], typer.Argument(help="Host names from the inventory.")],
    inventory: InventoryOpt = Path("nodes.yaml"),
    yes: Annotated[bool, typer.Option("--yes", help="Record every new key without asking (scripts).")] = False,
    json_flag: JsonOption = False,
) -> None:
    """Pin the SSH host keys of new hosts: connect, show each key's SHA256 fingerprint, and record it
    in the inventory's known_hosts only when you say so. A host whose key differs from the pinned
    one is refused.

    Examples:

    \b
      weightship nodes trust gpu1 gpu2 --inventory nodes.yaml
      weightship nodes trust gpu3 -i nodes.yaml --yes      # after checking the fingerprint out of band
    """
    import asyncio

    from weightship.deploy.nodes import ssh
    from weightship.errors import HostKeyChangedError, UsageError

    inv, selected = select(inventory, None, ",".join(hosts))
    rows = []
    for host in selected:
        public = asyncio.run(ssh.scan(inv, host))
        fp = ssh.key_fingerprint(public)
        pinned = ssh.pinned_fingerprints(inv, host)
        if fp in pinned:
            rows.append({"host": host.name, "fingerprint": fp, "state": "already trusted"})
            continue
        if pinned:
            raise HostKeyChangedError(host.name, pinned, fp)
        stderr.print(f"{host.name} ({host.target}) presents {public.split()[0]} key {fp}", highlight=False,
                     markup=False, soft_wrap=True)
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError(f"not recording {host.name}'s key: no terminal to ask on",
                                 hint="check the fingerprint on the node, then pass --yes")
            if not typer.confirm(f"Trust this key for {host.name}?", default=False):
                rows.append({"host": host.name, "fingerprint": fp, "state": "not trusted"})
                continue
        ssh.record(inv, host, public)
        rows.append({"host": host.name, "fingerprint": fp, "state": "trusted"})

    def human(console: Console) -> None:
        for r in rows:
            console.print(f"{r['host']}: {r['state']} ({r['fingerprint']})", highlight=False, soft_wrap=True)

    emit({"known_hosts": str(inv.known_hosts), "hosts": rows}, human, json_flag=json_flag)
    if any(r["state"] == "not trusted" for r in rows):
        raise typer.Exit(1)


@app.command("status")
def status(
    inventory: InventoryOpt = Path("nodes.yaml"),
    name: NameOpt = "weightship",
    group: GroupOpt = None,
    hosts: HostsOpt = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Re-hash each node's model "
                                         "(seconds per GB).")] = True,
    json_flag: JsonOption = False,
) -> None:
    """Show a deployment on every host: reachable, unit state, release, model and whether it
    verifies, /ready, GPUs.

    Examples:

    \b
      weightship nodes status -i nodes.yaml --name mistral
      weightship nodes status -i nodes.yaml --name mistral --group acme --json
    """
    from weightship.deploy.nodes import manage

    inv, selected = select(inventory, group, hosts)
    rows = manage.status(inv, selected, name, verify=verify)

    def human(console: Console) -> None:
        table = Table("host", "reachable", "unit", "release", "model", "verified", "ready", "GPUs")
        for r in rows:
            gpus = r.get("gpus")
            table.add_row(r["host"], "yes" if r["reachable"] else f"no ({r.get('why', '')})", r.get("unit", "-"),
                          r.get("release") or "-", r.get("model") or "-", str(r.get("verified", "-")),
                          str(r.get("ready", "-")), "-" if gpus is None else str(len(gpus)))
        console.print(table)

    emit({"name": name, "hosts": rows}, human, json_flag=json_flag)
    if not all(r["reachable"] for r in rows):
        raise typer.Exit(1)


@app.command("rollback")
def rollback(
    inventory: InventoryOpt = Path("nodes.yaml"),
    name: NameOpt = "weightship",
    group: GroupOpt = None,
    hosts: HostsOpt = None,
    max_unavailable: Annotated[str, typer.Option(help="Hosts switched at once: N or P%.")] = "1",
    max_failures: Annotated[int, typer.Option(help="Failed hosts tolerated before stopping.")] = 0,
    gate_timeout: Annotated[float, typer.Option(help="Seconds for a host to turn ready and answer.")] = 900.0,
    json_flag: JsonOption = False,
) -> None:
    """Go back one release on every host, rolling and gated as a rollout is.

    Examples:

    \b
      weightship nodes rollback -i nodes.yaml --name mistral
    """
    from weightship.deploy.nodes import manage
    from weightship.errors import RolloutFailedError

    inv, selected = select(inventory, group, hosts)
    try:
        rows = [r.to_json() for r in manage.rollback(inv, selected, name, max_unavailable=max_unavailable,
                                                      max_failures=max_failures, gate_timeout=gate_timeout, say=say)]
    except RolloutFailedError as e:
        show_results(e.results, json_flag)
        raise
    show_results(rows, json_flag)


def show_results(rows: list[dict[str, Any]], json_flag: bool) -> None:
    """Print the per-host table (or JSON) of a rollout or rollback."""
    emit({"hosts": rows}, lambda c: c.print(results_table(rows)), json_flag=json_flag)


@app.command("uninstall")
def uninstall(
    inventory: InventoryOpt = Path("nodes.yaml"),
    name: NameOpt = "weightship",
    group: GroupOpt = None,
    hosts: HostsOpt = None,
    purge: Annotated[bool, typer.Option("--purge", help="Also remove models no other deployment uses.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    json_flag: JsonOption = False,
) -> None:
    """Remove a deployment from the hosts: its unit, releases and service user (the model cache
    stays unless --purge).

    Examples:

    \b
      weightship nodes uninstall -i nodes.yaml --name mistral --yes
    """
    from weightship.deploy.nodes import manage
    from weightship.errors import UsageError

    inv, selected = select(inventory, group, hosts)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("uninstall asks first: pass --yes")
        typer.confirm(f"Remove {name} from {', '.join(h.name for h in selected)}?", abort=True)
    rows = manage.uninstall(inv, selected, name, purge=purge, say=say)

    def human(console: Console) -> None:
        for r in rows:
            console.print(f"{r['host']}: " + ("removed" if r["removed"] else f"NOT removed: {r['why']}"),
                          highlight=False, markup=False)

    emit({"name": name, "hosts": rows}, human, json_flag=json_flag)
    if not all(r["removed"] for r in rows):
        raise typer.Exit(1)


@app.command("logs")
def logs(
    inventory: InventoryOpt = Path("nodes.yaml"),
    name: NameOpt = "weightship",
    group: GroupOpt = None,
    hosts: HostsOpt = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines per host.")] = 50,
    json_flag: JsonOption = False,
) -> None:
    """Print the deployment's recent journal (journalctl -u) from each host.

    Examples:

    \b
      weightship nodes logs -i nodes.yaml --name mistral --hosts gpu1 -n 200
    """
    from weightship.deploy.nodes import manage

    inv, selected = select(inventory, group, hosts)
    out = manage.logs(inv, selected, name, lines=lines)

    def human(console: Console) -> None:
        for host, text in out.items():
            console.rule(host)
            console.out(text, highlight=False)

    emit(out, human, json_flag=json_flag)
