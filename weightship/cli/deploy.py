"""``weightship deploy``: run a model on Kubernetes with the Helm chart, and manage the release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from weightship.cli._common import JsonOption, emit, stderr, stdout, wants_json

app = typer.Typer(help="Deploy models on Kubernetes (Helm chart helm/weightship) and manage "
                       "the releases.", no_args_is_help=True)

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
