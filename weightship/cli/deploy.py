"""``weightship deploy``: run a model on Kubernetes with the Helm chart, and manage the release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from weightship.cli._common import JsonOption, emit, stderr, stdout, wants_json

app = typer.Typer(help="Deploy models on Kubernetes (Helm chart helm/weightship) or on your own "
                       "servers over SSH (`deploy nodes`), and manage the releases.", no_args_is_help=True)

Namespace = Annotated[str, typer.Option("--namespace", "-n", help="Kubernetes namespace.")]
Context = Annotated[str | None, typer.Option("--context", help="kubeconfig context "
                                             "[default: the current one].")]
Wait = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until every object is ready.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the rollout (a cold 14.5 GB "
                                        "fetch and load can take many minutes).")]


@app.command("k8s")
def k8s(
    model: Annotated[str, typer.Argument(help="Catalog name (see `weightship models`) or URI.")],
    release: Annotated[str, typer.Option("--release", "-r", help="Helm release name.")] = "weightship",
    namespace: Namespace = "default",
    values: Annotated[list[Path] | None, typer.Option("--values", "-f", help="Values file "
                                                      "(repeatable; later files win).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Value as KEY=VALUE, Helm "
                                                   "syntax (repeatable; wins over -f).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the checked manifests; "
                                          "needs no cluster.")] = False,
    wait: Wait = True,
    timeout: Timeout = 1800.0,
    gpus: Annotated[int | None, typer.Option(help="GPUs per pod; 0 serves on CPU "
                                             "[default: the chart's, 1].")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16, float16 or float32 "
                                              "[default: the card's].")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Sequences decoded together "
                                                  "[default: 8].")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Tokens per sequence "
                                                      "[default: min(8192, model limit)].")] = None,
    chart: Annotated[Path | None, typer.Option(help="Chart directory [default: the "
                                               "bundled helm/weightship].")] = None,
    context: Context = None,
    skip_preflight: Annotated[bool, typer.Option(help="Do not check the cluster first.")] = False,
    json_flag: JsonOption = False,
) -> None:
    """Install or upgrade a model's release: size it, render and check the chart, run preflight
    checks against the cluster, then install with Helm and wait for the rollout.

    Examples:

    \b
      weightship deploy k8s mistral-7b-v0.1 --release mistral -n ml
      weightship deploy k8s mistral-7b-v0.1 -n ml --set storage.mode=sharedPVC --dry-run
      weightship deploy k8s weightship-tiny -n demo --gpus 0 --set image.tag=0.1.0
    """
    from weightship.deploy import k8s as deployer

    plan = deployer.plan(model, release=release, namespace=namespace, value_files=values or (),
                         sets=set_ or (), chart=chart, gpus=gpus, dtype=dtype,
                         max_batch=max_batch, max_model_len=max_model_len)
    for exception in plan.accepted:
        stderr.print(f"note: accepted by storage.nodeCache.hostPathAcknowledged: {exception}",
                     highlight=False, markup=False)
    if dry_run:
        if wants_json(json_flag):
            emit({**plan.summary(), "manifests": plan.rendered.yaml_stream()}, lambda c: None,
                 json_flag=json_flag)
        else:
            stdout.out(plan.rendered.yaml_stream(), highlight=False)
            stderr.print(f"checked {len(plan.rendered.objects)} objects against Kubernetes "
                         f"{', '.join(plan.summary()['validated_for_kubernetes'])} (strict) and "
                         "the restricted Pod Security Standard", highlight=False)
        return
    result = deployer.apply(plan, context=context, wait=wait, timeout=timeout,
                            skip_preflight=skip_preflight)

    def human(console: Console) -> None:
        state = "ready" if wait else "applied (not waited for)"
        console.print(f"[green]✓[/] release {result['release']} revision {result['revision']} "
                      f"in {namespace}: {result['status']}, {state}", highlight=False)
        if result["notes"]:
            console.print(result["notes"], highlight=False, markup=False)

    emit({**result, **plan.summary()}, human, json_flag=json_flag)


@app.command("status")
def status(
    release: Annotated[str, typer.Argument(help="Helm release name.")],
    namespace: Namespace = "default",
    context: Context = None,
    json_flag: JsonOption = False,
) -> None:
    """Show a release: its revision, state, history, and whether its workloads are ready.

    Examples:

    \b
      weightship deploy status mistral -n ml
      helm status mistral -n ml            # the same release, seen by Helm
    """
    from weightship.deploy.k8s.deployer import workloads
    from weightship.deploy.k8s.release import Releases

    with Releases(namespace, context=context) as releases:
        current = releases.status(release)
        history = releases.history(release)
    ready = workloads(current.get("manifest", ""), namespace, context=context)
    data: dict[str, Any] = {
        "release": release, "namespace": namespace, "revision": current.get("revision"),
        "status": current.get("status"), "chart": f"{current.get('chart_name')}-"
                                                  f"{current.get('chart_version')}",
        "app_version": current.get("app_version"), "deployed_at": current.get("deployed_at"),
        "workloads": ready,
        "history": [{k: r.get(k) for k in ("revision", "status", "deployed_at", "description")}
                    for r in history]}

    def human(console: Console) -> None:
        console.print(f"release {release} in {namespace}: revision {data['revision']}, "
                      f"{data['status']} ({data['chart']})", highlight=False)
        table = Table("workload", "ready")
        for w in ready:
            table.add_row(f"{w['kind']}/{w['name']}",
                          f"{w['ready']}/{w['desired']}" if w["exists"] else "missing")
        console.print(table)
        revisions = Table("revision", "status", "deployed", "description")
        for r in data["history"]:
            revisions.add_row(str(r["revision"]), str(r["status"]), str(r["deployed_at"]),
                              str(r["description"] or ""))
        console.print(revisions)

    emit(data, human, json_flag=json_flag)


@app.command("rollback")
def rollback(
    release: Annotated[str, typer.Argument(help="Helm release name.")],
    revision: Annotated[int | None, typer.Argument(help="Revision to return to "
                                                   "[default: the previous one].")] = None,
    namespace: Namespace = "default",
    wait: Wait = True,
    timeout: Timeout = 1800.0,
    context: Context = None,
    json_flag: JsonOption = False,
) -> None:
    """Roll a release back to an earlier revision (recorded as a new revision, as Helm does).

    Examples:

    \b
      weightship deploy rollback mistral -n ml
      weightship deploy rollback mistral 2 -n ml --no-wait
    """
    from weightship.deploy.k8s.release import Releases

    with Releases(namespace, context=context) as releases:
        current = releases.rollback(release, revision, wait=wait, timeout=timeout)
    data = {"release": release, "namespace": namespace, "revision": current.get("revision"),
            "status": current.get("status"), "rolled_back_to": revision}

    def human(console: Console) -> None:
        to = f"revision {revision}" if revision else "the previous revision"
        console.print(f"[green]✓[/] {release} rolled back to {to}: now revision "
                      f"{data['revision']}, {data['status']}", highlight=False)

    emit(data, human, json_flag=json_flag)


@app.command("uninstall")
def uninstall(
    release: Annotated[str, typer.Argument(help="Helm release name.")],
    namespace: Namespace = "default",
    wait: Wait = True,
    timeout: Timeout = 600.0,
    context: Context = None,
    json_flag: JsonOption = False,
) -> None:
    """Remove a release and its objects (a shared model claim marked keep stays, so a
    reinstall starts without fetching).

    Examples:

    \b
      weightship deploy uninstall mistral -n ml
    """
    from weightship.deploy.k8s.release import Releases

    with Releases(namespace, context=context) as releases:
        result = releases.uninstall(release, wait=wait, timeout=timeout)
    data = {"release": release, "namespace": namespace, "info": result.get("info", "")}
    emit(data, lambda c: c.print(f"[green]✓[/] release {release} uninstalled from {namespace}",
                                 highlight=False), json_flag=json_flag)


# Long only by its options, which typer reads from the signature; the body parses and calls the library.
@app.command("nodes")
def nodes(
    model: Annotated[str, typer.Argument(help="Catalog name (see `weightship models`) or URI.")],
    inventory: Annotated[Path, typer.Option("--inventory", "-i", help="The nodes inventory (nodes.yaml).")
                         ] = Path("nodes.yaml"),
    group: Annotated[str | None, typer.Option("--group", "-g", help="Only this group's hosts.")] = None,
    hosts: Annotated[str | None, typer.Option("--hosts", help="Only these hosts (comma-separated).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Deployment name: the unit is "
                                             "weightship-NAME.service [default: from the model].")] = None,
    port: Annotated[int, typer.Option(help="Port every host serves on.", min=1, max=65535)] = 8000,
    api_key_file: Annotated[Path | None, typer.Option(help="API keys, one per line (required; they reach "
                                                      "the nodes only as a 0600 file for systemd's "
                                                      "LoadCredential=).")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs per host; 0 serves on CPU [default: the "
                                             "inventory's gpus:].", min=0)] = None,
    layout: Annotated[str | None, typer.Option(help="hf or original [default: the card's].")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision [default: the card's pin].")] = None,
    serve_arg: Annotated[list[str] | None, typer.Option("--serve-arg", help="Extra `weightship serve` "
                                                        "option, e.g. --serve-arg=--max-batch=32 "
                                                        "(repeatable).")] = None,
    max_unavailable: Annotated[str, typer.Option(help="Hosts switched at once: N or P%.")] = "1",
    max_failures: Annotated[int, typer.Option(help="Failed hosts tolerated before the rollout stops.",
                                              min=0)] = 0,
    gate_timeout: Annotated[float, typer.Option(help="Seconds a host has to turn ready and answer "
                                                "(a cold 7B load takes minutes).")] = 900.0,
    plan: Annotated[bool, typer.Option("--plan", help="Show what would change on each host; change "
                                       "nothing.")] = False,
    prepare_only: Annotated[bool, typer.Option("--prepare-only", help="Install, fetch and stage the "
                                               "release on every host, switch none.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before changing the hosts.")] = False,
    json_flag: JsonOption = False,
) -> None:
    """Roll a model out to your own GPU servers over SSH, as a hardened systemd service.

    Preflight on every host first; then each host fetches and verifies the model while its old
    release still serves; then at most --max-unavailable hosts at a time are drained, switched,
    started and gated (/ready, then a real chat completion). A host that fails its gate goes back
    to its previous release and the rollout stops there.

    Examples:

    \b
      weightship nodes trust gpu1 gpu2 -i nodes.yaml          # pin host keys first
      weightship deploy nodes mistral-7b-v0.1 -i nodes.yaml --group acme --name mistral \\
          --api-key-file keys.txt --plan
      weightship deploy nodes mistral-7b-v0.1 -i nodes.yaml --group acme --name mistral \\
          --api-key-file keys.txt --max-unavailable 25% --yes
    """
    import sys

    from weightship.cli.nodes import say, select, show_results
    from weightship.deploy.nodes import rollout
    from weightship.deploy.nodes.layout import check_name, check_serve_args, slug
    from weightship.deploy.nodes.rollout import parse_max_unavailable
    from weightship.deploy.nodes.want import Want, check_api_keys
    from weightship.errors import RolloutFailedError, UsageError

    inv, selected = select(inventory, group, hosts)
    if api_key_file is None:
        raise UsageError("--api-key-file is required: the nodes serve on the network",
                         hint="make one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > keys.txt")
    try:
        keys = check_api_keys(api_key_file.read_text(), str(api_key_file))
    except OSError as e:
        raise UsageError(f"cannot read --api-key-file {api_key_file}: {e.strerror or e}") from None
    want = Want(name=check_name(name or slug(model, 50)), model=model, layout=layout, revision=revision, port=port,
                gpus=gpus, serve_args=check_serve_args(tuple(serve_arg or ())), api_keys=keys,
                model_bytes=_model_bytes(model, layout), gate_timeout=gate_timeout)
    parse_max_unavailable(max_unavailable, len(selected))  # a bad value is refused before any connection
    if plan or not yes:
        rows = rollout.plan(inv, selected, want, say=say)
        _show_plan(rows, json_flag)
        if plan or all(r["action"] == "none" for r in rows):
            return
        if not sys.stdin.isatty():
            raise UsageError("deploy nodes asks before changing hosts: pass --yes (or --plan to only look)")
        typer.confirm(f"Roll {model} out to {len(selected)} host(s) as {want.name}?", abort=True)
    try:
        results = rollout.deploy(inv, selected, want, max_unavailable=max_unavailable, max_failures=max_failures,
                                 prepare_only=prepare_only, say=say)
    except RolloutFailedError as e:
        show_results(e.results, json_flag)
        raise
    show_results([r.to_json() for r in results], json_flag)


def _model_bytes(model: str, layout: str | None) -> int | None:
    from weightship.catalog import is_catalog_name, load_card

    return load_card(model).layout(layout).total_bytes() if is_catalog_name(model) else None


def _show_plan(rows: list[dict[str, Any]], json_flag: bool) -> None:
    def human(console: Console) -> None:
        for r in rows:
            console.rule(f"{r['host']}: {r['action']}")
            console.print(f"release  {r['release']['old'] or '-'} → {r['release']['new']}\n"
                          f"model    {r['model']['old'] or '-'} → {r['model']['new']} "
                          f"({'on the node' if r['model']['present'] else 'to fetch'})\n"
                          f"runtime  {r['runtime']['old'] or '-'} → {r['runtime']['new']} "
                          f"({'installed' if r['runtime']['present'] else 'to install'})", highlight=False,
                          markup=False)
            if r["unit_diff"]:
                console.out(r["unit_diff"], highlight=False)

    emit({"plan": rows}, human, json_flag=json_flag)
