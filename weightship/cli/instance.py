"""``weightship instance``: dedicated instances for companies (create, list, show, scale,
upgrade, pause, resume, delete), their API keys and their usage.

Over 400 lines, on purpose: thirteen small commands that share one set of option types (where an
instance runs: ``--on``, ``--inventory``, ``--context``) and one way to print; each only parses its
options and calls :mod:`weightship.instances`. Split in two, the halves would import each other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from weightship.cli._common import JsonOption, emit, stderr, stdout, wants_json

if TYPE_CHECKING:
    from weightship.instances import Target

app = typer.Typer(help="Dedicated instances for companies: one isolated, metered endpoint per "
                       "company, with its own nodes, API keys and usage figures.",
                  no_args_is_help=True)
keys_app = typer.Typer(help="API keys of an instance (only their hashes are stored).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")

Name = Annotated[str, typer.Argument(help="Instance name (a DNS label, at most 40 characters).")]
On = Annotated[str | None, typer.Option("--on", help="Where the instance runs: k8s or nodes "
                                        "[default: nodes with --inventory, else k8s].")]
Inventory = Annotated[Path | None, typer.Option("--inventory", "-i", envvar="WEIGHTSHIP_INVENTORY",
                                                help="Nodes inventory (instances on nodes).")]
Context = Annotated[str | None, typer.Option("--context", help="kubeconfig context "
                                             "[default: the current one].")]
Wait = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the replicas are ready.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait (a cold 14.5 GB fetch and load "
                                        "takes many minutes).")]


def _target(on: str | None, inventory: Path | None, context: str | None, **more: Any) -> Target:
    from weightship.instances import TargetOptions, target

    chosen = on or ("nodes" if inventory else "k8s")
    return target(chosen, TargetOptions(context=context, inventory=inventory, **more))


def _confirm(yes: bool) -> Callable[[str], bool] | None:
    """How the library asks before it changes hosts: not at all with --yes, at the terminal when
    there is one, else it cannot (and refuses)."""
    if yes:
        return lambda question: True
    if not sys.stdin.isatty():
        return None
    return lambda question: typer.confirm(question, default=False)


def _info_human(info: dict[str, Any]) -> Any:
    def human(console: Console) -> None:
        state = "paused" if info.get("paused") else f"{info.get('ready')}/{info.get('replicas')} ready"
        console.print(f"instance {info['name']} ({info['target']}): {info['model']}, {state}",
                      highlight=False, markup=False)
        for key in ("namespace", "endpoint", "version", "gpus", "nodes", "hosts", "keys",
                    "release", "quota", "created"):
            if info.get(key) not in (None, [], {}):
                console.print(f"  {key:<10} {info[key]}", highlight=False, markup=False)
    return human


# Long only by its options, which typer reads from the signature; the body parses and calls the library.
@app.command("create")
def create(
    name: Name,
    model: Annotated[str, typer.Option("--model", help="Catalog name (see `weightship models`) "
                                       "or URI.")],
    on: Annotated[str, typer.Option("--on", help="k8s or nodes.")],
    replicas: Annotated[int, typer.Option(help="Serving replicas.")] = 1,
    gpus: Annotated[int, typer.Option(help="GPUs per replica; 0 serves on CPU.")] = 1,
    host: Annotated[str | None, typer.Option(help="Public host name of the endpoint (an Ingress "
                                             "on Kubernetes).")] = None,
    tls_secret: Annotated[str | None, typer.Option(help="TLS Secret for --host (in the "
                                                   "instance's namespace wsi-NAME).")] = None,
    version: Annotated[str | None, typer.Option(help="weightship version to run (image tag) "
                                                "[default: the chart's].")] = None,
    inventory: Inventory = None,
    hosts: Annotated[str | None, typer.Option(help="Hosts given to the instance "
                                              "(comma-separated; nodes).")] = None,
    group: Annotated[str | None, typer.Option(help="Inventory group given to the instance "
                                              "(nodes).")] = None,
    values: Annotated[list[Path] | None, typer.Option("--values", "-f", help="Chart values file "
                                                      "(k8s; repeatable).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Chart value KEY=VALUE "
                                                   "(k8s; repeatable).")] = None,
    allow_from: Annotated[list[str] | None, typer.Option(
        "--allow-from", help="Namespace allowed to reach the API port: your ingress controller's, "
        "Prometheus' (k8s; repeatable) [default: ingress-nginx].")] = None,
    admin_from: Annotated[list[str] | None, typer.Option(
        "--admin-from", help="CIDR the API server reaches pods from, for `instance usage` "
        "(k8s; repeatable) [default: the addresses of endpoints default/kubernetes].")] = None,
    chart: Annotated[Path | None, typer.Option(help="Chart directory (k8s).")] = None,
    context: Context = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print every object the instance "
                                          "would own as YAML; change nothing, need no cluster.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before changing hosts (nodes).")] = False,
    port: Annotated[int | None, typer.Option(help="Port the hosts serve on (nodes) [default: 8000].",
                                             min=1, max=65535)] = None,
    wait: Wait = True,
    timeout: Timeout = 1800.0,
    json_flag: JsonOption = False,
) -> None:
    """Create a dedicated instance: its namespace (or hosts), quota, network isolation, key
    store, and one release of the model on the company's own nodes.

    On Kubernetes, first taint the company's GPU nodes:
    kubectl taint nodes NODE weightship.io/dedicated=NAME:NoSchedule

    Examples:

    \b
      weightship instance create acme --model mistral-7b-v0.1 --on k8s --host api.acme.example \\
          --tls-secret acme-tls
      weightship instance create acme --model mistral-7b-v0.1 --on k8s --dry-run > acme.yaml
      weightship instance create acme --model mistral-7b-v0.1 --on nodes -i nodes.yaml --group acme
    """
    from weightship.instances import InstanceSpec

    spec = InstanceSpec(name=name, model=model, replicas=replicas, gpus=gpus, host=host,
                        tls_secret=tls_secret, version=version)
    target = _target(on, inventory, context, chart=chart, value_files=tuple(values or ()),
                     sets=tuple(set_ or ()), hosts=tuple(h for h in (hosts or "").split(",") if h),
                     group=group, confirm=_confirm(yes), port=port,
                     allow_from=tuple(allow_from) if allow_from else ("ingress-nginx",),
                     admin_from=tuple(admin_from) if admin_from else None)
    if dry_run:
        docs = target.plan(spec)
        if wants_json(json_flag):
            emit({"name": name, "objects": docs}, lambda c: None, json_flag=json_flag)
        else:
            stdout.out(yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True),
                       highlight=False)
        return
    info = target.create(spec, wait=wait, timeout=timeout)
    emit(info, _info_human(info), json_flag=json_flag)


@app.command("list")
def list_(on: On = None, inventory: Inventory = None, context: Context = None,
          json_flag: JsonOption = False) -> None:
    """List the instances, read from the cluster (or the inventory's hosts) itself.

    Examples:

    \b
      weightship instance list
      weightship instance list --json | jq '.[].name'
    """
    items = _target(on, inventory, context).list()

    def human(console: Console) -> None:
        table = Table("name", "target", "model", "replicas", "state", "endpoint")
        for i in items:
            table.add_row(i["name"], i["target"], i["model"], f"{i['ready']}/{i['replicas']}",
                          "paused" if i["paused"] else str((i.get("release") or {}).get("status", "")),
                          str(i.get("endpoint") or ""))
        console.print(table)

    emit(items, human, json_flag=json_flag)


@app.command("show")
def show(name: Name, on: On = None, inventory: Inventory = None, context: Context = None,
         json_flag: JsonOption = False) -> None:
    """Show one instance: model, replicas, endpoint, nodes, keys, quota.

    Examples:

    \b
      weightship instance show acme
    """
    info = _target(on, inventory, context).show(name)
    emit(info, _info_human(info), json_flag=json_flag)


@app.command("scale")
def scale(name: Name,
          replicas: Annotated[int, typer.Option("--replicas", help="Serving replicas (at least 1; "
                                                "pause to run none).")],
          on: On = None, inventory: Inventory = None, context: Context = None, wait: Wait = True,
          timeout: Timeout = 1800.0, json_flag: JsonOption = False) -> None:
    """Change the number of replicas (the quota follows).

    Examples:

    \b
      weightship instance scale acme --replicas 3
    """
    info = _target(on, inventory, context).scale(name, replicas, wait=wait, timeout=timeout)
    emit(info, _info_human(info), json_flag=json_flag)


@app.command("upgrade")
def upgrade(name: Name,
            model: Annotated[str | None, typer.Option("--model", help="New model.")] = None,
            version: Annotated[str | None, typer.Option("--version", help="New weightship "
                                                        "version (image tag).")] = None,
            on: On = None, inventory: Inventory = None, context: Context = None,
            wait: Wait = True, timeout: Timeout = 1800.0, json_flag: JsonOption = False) -> None:
    """Roll the instance to a new model or version, one replica at a time, each gated on its
    health; a failed gate rolls the instance back to where it was (exit 1).

    Examples:

    \b
      weightship instance upgrade acme --version 0.3.0
      weightship instance upgrade acme --model mistral-7b-instruct-v0.2
    """
    from weightship.errors import UsageError

    if not model and not version:
        raise UsageError("upgrade needs --model or --version")
    info = _target(on, inventory, context).upgrade(name, model=model, version=version, wait=wait,
                                                   timeout=timeout)
    emit(info, _info_human(info), json_flag=json_flag)


@app.command("pause")
def pause(name: Name, on: On = None, inventory: Inventory = None, context: Context = None,
          wait: Wait = True, timeout: Timeout = 600.0, json_flag: JsonOption = False) -> None:
    """Stop every replica: no GPU is held; the verified weights stay on their volumes.

    Examples:

    \b
      weightship instance pause acme
    """
    info = _target(on, inventory, context).pause(name, wait=wait, timeout=timeout)
    emit(info, _info_human(info), json_flag=json_flag)


@app.command("resume")
def resume(name: Name, on: On = None, inventory: Inventory = None, context: Context = None,
           wait: Wait = True, timeout: Timeout = 1800.0, json_flag: JsonOption = False) -> None:
    """Start a paused instance's replicas again, on the weights they kept (no new fetch).

    Examples:

    \b
      weightship instance resume acme
    """
    info = _target(on, inventory, context).resume(name, wait=wait, timeout=timeout)
    emit(info, _info_human(info), json_flag=json_flag)


@app.command("delete")
def delete(name: Name,
           yes: Annotated[bool, typer.Option("--yes", help="Delete without asking.")] = False,
           on: On = None, inventory: Inventory = None, context: Context = None,
           timeout: Timeout = 600.0, json_flag: JsonOption = False) -> None:
    """Remove everything the instance owns (its weights and usage records included), then
    check that nothing of it is left.

    Examples:

    \b
      weightship instance delete acme --yes
    """
    from weightship.errors import UsageError
    from weightship.instances import check_name

    check_name(name)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"delete removes instance {name!r} and its data: pass --yes")
        typer.confirm(f"Delete instance {name} and everything it owns?", abort=True)
    result = _target(on, inventory, context).delete(name, timeout=timeout)
    emit(result, lambda c: c.print(f"[green]✓[/] instance {name} deleted; nothing of it is left",
                                   highlight=False), json_flag=json_flag)


# ---- keys ------------------------------------------------------------------------------------


KeysWait = Annotated[float, typer.Option("--timeout", help="Seconds to wait for every running "
                                         "server to load the new keys (k8s); then the command "
                                         "names the servers that did not, and exits 1.")]


def _keys_change(change: Callable[[], dict[str, Any]], human: Callable[[dict[str, Any]], Any],
                 json_flag: bool) -> None:
    """Run a key change and print its result; when some servers did not load it in time, a
    new key is printed all the same (it is stored, and shown this once), then the error."""
    from weightship.errors import KeysNotLoadedError

    try:
        result = change()
    except KeysNotLoadedError as e:
        if e.result is not None and "key" in e.result:
            emit(e.result, human(e.result), json_flag=json_flag)
        raise
    emit(result, human(result), json_flag=json_flag)


@keys_app.command("add")
def keys_add(name: Name,
             key_name: Annotated[str, typer.Option("--key-name", help="What the key is for "
                                                   "(unique within the instance).")],
             on: On = None, inventory: Inventory = None, context: Context = None,
             timeout: KeysWait = 10.0, json_flag: JsonOption = False) -> None:
    """Make a new API key and print it, this once: only its hash is stored. Returns once every
    running server accepts it.

    Examples:

    \b
      weightship instance keys add acme --key-name ci
      KEY=$(weightship instance keys add acme --key-name ci --json | jq -r .key)
    """
    from weightship.instances import keys

    def human(added: dict[str, Any]) -> Callable[[Console], None]:
        return lambda c: c.print(f"key {added['name']} ({added['id']}) for {name}, shown once:\n"
                                 f"{added['key']}", highlight=False, markup=False)

    _keys_change(lambda: keys.add(_target(on, inventory, context, keys_wait=timeout), name,
                                  key_name), human, json_flag)


@keys_app.command("list")
def keys_list(name: Name, on: On = None, inventory: Inventory = None, context: Context = None,
              json_flag: JsonOption = False) -> None:
    """List an instance's keys: names, ids and creation times (never the keys).

    Examples:

    \b
      weightship instance keys list acme
    """
    from weightship.instances import keys

    rows = keys.listing(_target(on, inventory, context), name)

    def human(console: Console) -> None:
        table = Table("name", "id", "created")
        for r in rows:
            table.add_row(r["name"], r["id"], r["created"])
        console.print(table)

    emit(rows, human, json_flag=json_flag)


@keys_app.command("revoke")
def keys_revoke(name: Name, key_name: Annotated[str, typer.Argument(help="The key's name.")],
                on: On = None, inventory: Inventory = None, context: Context = None,
                timeout: KeysWait = 10.0, json_flag: JsonOption = False) -> None:
    """Revoke a key: the instance's servers refuse it within seconds, without a restart. Returns
    once every running server refuses it.

    Examples:

    \b
      weightship instance keys revoke acme ci
    """
    from weightship.instances import keys

    def human(result: dict[str, Any]) -> Callable[[Console], None]:
        return lambda c: c.print(f"[green]✓[/] key {key_name} ({result['id']}) of {name} "
                                 "revoked", highlight=False)

    _keys_change(lambda: keys.revoke(_target(on, inventory, context, keys_wait=timeout), name,
                                     key_name), human, json_flag)


# ---- usage -----------------------------------------------------------------------------------


@app.command("usage")
def usage(name: Name,
          since: Annotated[str | None, typer.Option(help="From this date or time (UTC; "
                                                    "YYYY-MM-DD or ISO 8601).")] = None,
          until: Annotated[str | None, typer.Option(help="Until this date (inclusive) or "
                                                    "time (exclusive).")] = None,
          by: Annotated[str, typer.Option("--by", help="key or day.")] = "key",
          csv_flag: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
          partial: Annotated[bool, typer.Option(
              "--partial", help="Sum what could be read when some replicas or hosts could not "
              "be (named on stderr; with --json the output is {\"rows\", \"unreached\"}) "
              "instead of failing.")] = False,
          on: On = None, inventory: Inventory = None, context: Context = None,
          json_flag: JsonOption = False) -> None:
    """Sum the usage records of every replica of an instance: requests, prompt and completion
    tokens (of the requests answered 200) and errors, per key or per day. Exits 1 when some
    replica or host holds records that could not be read, unless --partial.

    Examples:

    \b
      weightship instance usage acme --since 2026-05-01 --until 2026-05-31
      weightship instance usage acme --by day --csv > acme-may.csv
      weightship instance usage acme --partial --json | jq .unreached
    """
    from weightship.errors import UsageError, UsageIncompleteError
    from weightship.instances import usage as report

    if by not in report.FIELDS:
        raise UsageError(f"--by must be key or day, not {by!r}")
    start, end = report.parse_when(since), report.parse_when(until, end=True)
    target = _target(on, inventory, context, since=start, until=end)
    names = {k.id: k.name for k in target.read_keys(name).keys}
    read = target.usage_records(name)
    rows = report.summarize(read.all(), by, names, since=start, until=end)
    if read.unreached and not partial:
        raise UsageIncompleteError(name, read.unreached)
    for where in read.unreached:
        stderr.print(f"warning: not read: {where}; its records are not in these sums",
                     highlight=False, markup=False)
    if csv_flag:
        stdout.out(report.to_csv(rows, by), highlight=False, end="")
        return

    def human(console: Console) -> None:
        table = Table(*report.FIELDS[by])
        for r in rows:
            table.add_row(*(str(r[f]) for f in report.FIELDS[by]))
        console.print(table)

    emit({"rows": rows, "unreached": read.unreached} if partial else rows, human,
         json_flag=json_flag)
