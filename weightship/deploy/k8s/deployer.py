"""``weightship deploy k8s`` as library calls: plan (values → render → check), then apply
(preflight → install or upgrade → wait).

Steps of :func:`plan`, none of which needs a cluster:
1. read the user's values (``-f`` files, then ``--set``), as ``helm install`` would;
2. size the model from its catalog card for the GPU count and dtype those values ask for, and
   derive the chart values (storage size, GPU memory, host memory, batch shape);
3. render the chart with Helm's engine (values.schema.json and validateValues run here);
4. check every object against the official schemas of each supported Kubernetes version
   (strict), the "restricted" Pod Security Standard, and for plain-value credentials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightship.deploy.k8s import helm as helm_engine
from weightship.deploy.k8s import policy, preflight
from weightship.deploy.k8s.cluster import connect
from weightship.deploy.k8s.release import Releases
from weightship.deploy.k8s.sizing import Sizing
from weightship.deploy.k8s.values import (
    Values,
    compose,
    derived_values,
    load_value_files,
    merge,
    model_shape,
    parse_sets,
)
from weightship.errors import RenderedObjectsRejectedError

# Violations the chart accepts only when the user acknowledged storage.mode=nodeCache: the
# hostPath itself and the root init container that hands the node directory to the chart's uid.
NODE_CACHE_RULES = {"hostPath volumes"}
NODE_CACHE_CONTAINER = "prepare-node-cache"


@dataclass
class Plan:
    """A rendered, checked release, ready to apply."""

    model: str
    release: str
    namespace: str
    chart: Path
    values: Values  # what the release is installed with (derived + user)
    effective: Values  # the same coalesced with the chart's defaults
    rendered: helm_engine.Rendered
    sizing: Sizing | None
    unchecked_kinds: list[str] = field(default_factory=list)  # no official schema (CRDs)
    accepted: list[str] = field(default_factory=list)  # policy exceptions the user opted into

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "release": self.release, "namespace": self.namespace,
                "objects": [policy.object_name(o) for o in self.rendered.objects],
                "sizing": self.sizing.summary() if self.sizing else None,
                "validated_for_kubernetes": list(helm_engine.SUPPORTED_KUBERNETES),
                "unchecked_kinds": self.unchecked_kinds,
                "accepted_policy_exceptions": self.accepted}


def _get(values: Values, *path: str) -> Any:
    for key in path:
        values = values.get(key) if isinstance(values, dict) else None  # type: ignore[assignment]
    return values


def check_objects(objects: list[dict[str, Any]], effective: Values) -> tuple[list[str], list[str],
                                                                               list[str]]:
    """(problems, unchecked kinds, accepted exceptions) of rendered ``objects``."""
    problems, unchecked = policy.schema_problems(objects, helm_engine.SUPPORTED_KUBERNETES)
    node_cache = (_get(effective, "storage", "mode") == "nodeCache"
                  and _get(effective, "storage", "nodeCache", "hostPathAcknowledged") is True)
    accepted: list[str] = []
    for obj in objects:
        for v in policy.restricted_violations(obj):
            if node_cache and (v.rule in NODE_CACHE_RULES or v.container == NODE_CACHE_CONTAINER):
                accepted.append(str(v))
            else:
                problems.append(f"restricted Pod Security Standard: {v}")
        problems += [str(v) for v in policy.plain_credentials(obj)]
    return problems, unchecked, accepted


def plan(model: str, *, release: str, namespace: str, value_files: Sequence[Path] = (),
         sets: Sequence[str] = (), chart: Path | None = None, gpus: int | None = None,
         dtype: str | None = None, max_batch: int | None = None,
         max_model_len: int | None = None, is_upgrade: bool = False,
         overrides: Values | None = None) -> Plan:
    """Derive values, render and check a release of ``model``; see the module docstring.

    ``overrides`` are merged last, over the user's ``-f``/``--set``: values a caller (an
    instance) must hold whatever the user asks."""
    chart_dir = helm_engine.chart_path(chart)
    files, set_layers = load_value_files(value_files), parse_sets(sets)
    user = compose({}, files, set_layers)
    defaults = helm_engine.effective_values(chart_dir, {})
    asked = helm_engine.effective_values(chart_dir, user)
    gpu_count = int(_get(user, "gpu", "count") if _get(user, "gpu", "count") is not None
                    else gpus if gpus is not None else _get(defaults, "gpu", "count"))
    model_name = _get(user, "model", "name") or model
    shape = model_shape(
        model_name, dtype=_get(user, "serve", "dtype") or dtype,
        max_batch=int(_get(user, "serve", "maxBatch") or max_batch or
                      _get(asked, "serve", "maxBatch")),
        max_model_len=int(_get(user, "serve", "maxModelLen") or max_model_len or 0) or None)
    values = compose(derived_values(shape, gpus=gpu_count), files, set_layers)
    if overrides:
        values = merge(values, overrides)
    rendered = helm_engine.render(chart_dir, values, release=release, namespace=namespace,
                                  is_upgrade=is_upgrade)
    effective = helm_engine.effective_values(chart_dir, values)
    problems, unchecked, accepted = check_objects(rendered.objects + rendered.hooks, effective)
    if problems:
        raise RenderedObjectsRejectedError(problems)
    return Plan(model=model_name, release=release, namespace=namespace, chart=chart_dir,
                values=values, effective=effective, rendered=rendered, sizing=shape.sizing,
                unchecked_kinds=unchecked, accepted=accepted)


def apply(p: Plan, *, context: str | None = None, wait: bool = True, timeout: float = 1800,
          skip_preflight: bool = False) -> dict[str, Any]:
    """Preflight against the cluster, then install or upgrade the release and wait for it."""
    if not skip_preflight:
        preflight.run(connect(context), p.namespace, p.effective, p.rendered.objects)
    with Releases(p.namespace, context=context) as releases:
        result = releases.deploy(p.chart, p.release, p.values, wait=wait, timeout=timeout)
    return {"release": result.get("name", p.release), "namespace": p.namespace,
            "revision": result.get("revision"), "status": result.get("status"),
            "notes": result.get("notes", ""), "waited": wait}


WORKLOAD_PATHS = {"Deployment": "deployments", "StatefulSet": "statefulsets",
                  "DaemonSet": "daemonsets"}


def workloads(manifest: str, namespace: str, *, context: str | None = None) -> list[dict[str, Any]]:
    """Readiness of the Deployments, StatefulSets and DaemonSets of a release manifest."""
    import yaml

    cluster = connect(context)
    out = []
    for obj in yaml.safe_load_all(manifest or ""):
        if not obj or obj.get("kind") not in WORKLOAD_PATHS:
            continue
        name = obj["metadata"]["name"]
        live = cluster.get(f"/apis/apps/v1/namespaces/{namespace}/"
                           f"{WORKLOAD_PATHS[obj['kind']]}/{name}") or {}
        status = live.get("status") or {}
        if obj["kind"] == "DaemonSet":
            desired, ready = status.get("desiredNumberScheduled", 0), status.get("numberReady", 0)
        else:
            desired = (live.get("spec") or {}).get("replicas", 1)
            ready = status.get("readyReplicas", 0)
        out.append({"kind": obj["kind"], "name": name, "ready": ready, "desired": desired,
                    "exists": bool(live)})
    return out
