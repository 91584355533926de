"""The object store behind the fake Kubernetes API server (see ``fakekube.py``).

This is the one stand-in for Kubernetes in the test suite: no API server can run on these
machines (no container engine, no server binaries in any registry). It is generic over
resource kinds: a table of built-in kinds plus any kind a CustomResourceDefinition adds, each
stored the same way (uid, resourceVersion, generation, namespaces, label and field selectors,
merge / JSON / strategic-merge patches and server-side apply with field pruning per manager,
garbage collection by ownerReferences, ``metadata.finalizers``). A small "controller" gives
workloads the status the real controllers would, after a delay: the same rule for every object
of a kind, never scripted per test.

Finalizers, for every kind: deleting an object whose ``metadata.finalizers`` is not empty only
marks it (``deletionTimestamp``; a Namespace's phase turns ``Terminating``, its contents are
deleted as the namespace controller would, and nothing new may be created in it); the object
goes once a write leaves its finalizers empty.
"""

from __future__ import annotations

import base64
import copy
import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """One served resource type."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def _k(gv: str, kind: str, plural: str, namespaced: bool = True, status: bool = True) -> Kind:
    group, _, version = gv.rpartition("/")
    return Kind(group, version, kind, plural, namespaced, ("status",) if status else ())


BUILTIN_KINDS = [
    _k("v1", "Namespace", "namespaces", namespaced=False),
    _k("v1", "Node", "nodes", namespaced=False),
    _k("v1", "Pod", "pods"),
    _k("v1", "Service", "services"),
    _k("v1", "Secret", "secrets", status=False),
    _k("v1", "ConfigMap", "configmaps", status=False),
    _k("v1", "ServiceAccount", "serviceaccounts", status=False),
    _k("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    _k("v1", "PersistentVolume", "persistentvolumes", namespaced=False),
    _k("v1", "Event", "events", status=False),
    _k("v1", "ResourceQuota", "resourcequotas"),
    _k("v1", "LimitRange", "limitranges", status=False),
    _k("v1", "Endpoints", "endpoints", status=False),
    _k("apps/v1", "Deployment", "deployments"),
    _k("apps/v1", "StatefulSet", "statefulsets"),
    _k("apps/v1", "DaemonSet", "daemonsets"),
    _k("apps/v1", "ReplicaSet", "replicasets"),
    _k("batch/v1", "Job", "jobs"),
    _k("networking.k8s.io/v1", "Ingress", "ingresses"),
    _k("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", status=False),
    _k("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    _k("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    _k("storage.k8s.io/v1", "StorageClass", "storageclasses", namespaced=False, status=False),
    _k("node.k8s.io/v1", "RuntimeClass", "runtimeclasses", namespaced=False, status=False),
    _k("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions",
       namespaced=False),
]


class ApiError(Exception):
    """An error the API answers with a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


# ---- selectors -------------------------------------------------------------------------------

_REQ = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(==|=|!=|\s+in\s+|\s+notin\s+)\s*(.*?))?\s*$")


def _split_selector(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur] if p.strip()]


def matches_selector(labels: dict[str, str], selector: str | None) -> bool:
    """Whether ``labels`` satisfy a label selector string (=, ==, !=, in, notin, exists, !)."""
    for req in _split_selector(selector or ""):
        m = _REQ.match(req)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {req!r}")
        neg, key, op, value = m.groups()
        op = (op or "").strip()
        if not op:
            ok = (key in labels) != bool(neg)
        elif op in ("=", "=="):
            ok = labels.get(key) == value
        elif op == "!=":
            ok = labels.get(key) != value
        else:
            values = {v.strip() for v in value.strip("() ").split(",")}
            ok = (labels.get(key) in values) == (op == "in")
        if not ok:
            return False
    return True


def matches_fields(obj: Obj, selector: str | None) -> bool:
    """Whether ``obj`` satisfies a field selector (dotted paths, = / == / !=)."""
    for req in _split_selector(selector or ""):
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", req)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {req!r}")
        path, op, value = m.groups()
        actual: Any = obj
        for part in path.split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        if (str(actual or "") == value) != (op != "!="):
            return False
    return True


# ---- patches ---------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes strategic merge: like a merge patch, but lists of named objects merge by name
    and the ``$patch``/``$setElementOrder``/``$retainKeys`` directives are honoured."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    out = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and _named_list(value) and _named_list(out.get(key, [])):
            out[key] = _merge_named_lists(out.get(key, []), value,
                                          patch.get(f"$setElementOrder/{key}"))
        else:
            out[key] = strategic_merge_patch(out.get(key), value)
    if retain is not None:
        out = {k: v for k, v in out.items() if k in retain or k not in target}
    return out


def _named_list(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(i, dict) and "name" in i for i in items)


def _merge_named_lists(current: list[Obj], patch: list[Obj], order: list[Obj] | None) -> list[Obj]:
    merged = {i["name"]: i for i in current}
    for item in patch:
        if item.get("$patch") == "delete":
            merged.pop(item["name"], None)
        else:
            merged[item["name"]] = strategic_merge_patch(merged.get(item["name"]), item)
    names = [o["name"] for o in order] if order else [i["name"] for i in current] + [
        i["name"] for i in patch if i["name"] not in {c["name"] for c in current}]
    return [merged[n] for n in names if n in merged] + [
        v for n, v in merged.items() if n not in names]


def json_patch(target: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902 JSON patch (add, remove, replace, test)."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if op["op"] == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op["value"]:
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(idx, op["value"])
            else:
                parent[idx] = op["value"]
        else:
            parent[last] = op["value"]
    return doc


def prune_applied(current: Any, before: Any, applied: Any) -> Any:
    """Server-side apply's removal rule for one manager: fields it applied last time and no
    longer applies are removed; fields set by others are kept."""
    if not isinstance(current, dict) or not isinstance(before, dict):
        return current
    out = dict(current)
    for key, old in before.items():
        if not isinstance(applied, dict) or key not in applied:
            out.pop(key, None)
        elif isinstance(old, dict):
            out[key] = prune_applied(out.get(key), old, applied[key])
    return out


def apply_merge(current: Any, applied: Any) -> Any:
    """Merge an applied configuration: maps merge, named lists merge by name, other lists and
    scalars are replaced (the list semantics of the built-in types' atomic/map lists)."""
    if isinstance(applied, dict) and isinstance(current, dict):
        return {**current, **{k: apply_merge(current.get(k), v) for k, v in applied.items()}}
    if _named_list(applied) and _named_list(current):
        old = {i["name"]: i for i in current}
        return [apply_merge(old.get(i["name"]), i) for i in applied]
    return copy.deepcopy(applied)


# ---- the store -------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Event:
    rv: int
    type: str
    kind: Kind
    obj: Obj


@dataclass
class Store:
    """Every object, by (kind plural key, namespace, name); thread-safe."""

    ready_delay: float = 0.3
    stalled_kinds: set[str] = field(default_factory=set)  # never become ready (timeouts)
    kinds: dict[tuple[str, str, str], Kind] = field(default_factory=dict)
    objects: dict[tuple[str, str, str], dict[tuple[str, str], Obj]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    applied: dict[tuple[Any, ...], Obj] = field(default_factory=dict)  # (key, manager) -> last
    changed_at: dict[str, float] = field(default_factory=dict)  # uid -> when spec last changed
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) log
    cond: threading.Condition = field(default_factory=threading.Condition)
    _rv: Iterator[int] = field(default_factory=lambda: itertools.count(1000))

    def __post_init__(self) -> None:
        for kind in BUILTIN_KINDS:
            self.kinds[(kind.group, kind.version, kind.plural)] = kind

    # -- lookup -----------------------------------------------------------------------------

    def kind(self, group: str, version: str, plural: str) -> Kind:
        try:
            return self.kinds[(group, version, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                            f"({group}/{version} {plural})") from None

    def kind_of(self, api_version: str, kind_name: str) -> Kind:
        for kind in self.kinds.values():
            if kind.api_version == api_version and kind.kind == kind_name:
                return kind
        raise ApiError(404, "NotFound", f"no matches for kind {kind_name!r} in {api_version!r}")

    def _bucket(self, kind: Kind) -> dict[tuple[str, str], Obj]:
        return self.objects.setdefault((kind.group, kind.version, kind.plural), {})

    def get(self, kind: Kind, ns: str, name: str) -> Obj:
        with self.cond:
            obj = self._bucket(kind).get((ns, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind.plural}{"." + kind.group if kind.group else ""}'
                                                f' "{name}" not found')
            return copy.deepcopy(obj)

    def list(self, kind: Kind, ns: str | None, labels: str | None = None,
             fields: str | None = None) -> tuple[list[Obj], int]:
        with self.cond:
            items = [copy.deepcopy(o) for (o_ns, _), o in sorted(self._bucket(kind).items())
                     if (ns is None or o_ns == ns)
                     and matches_selector(o["metadata"].get("labels") or {}, labels)
                     and matches_fields(o, fields)]
            return items, self.last_rv()

    def last_rv(self) -> int:
        return self.events[-1].rv if self.events else 999

    # -- writes -----------------------------------------------------------------------------

    def _record(self, type_: str, kind: Kind, obj: Obj) -> None:
        rv = next(self._rv)
        if type_ != "DELETED":
            obj["metadata"]["resourceVersion"] = str(rv)
        self.events.append(Event(rv, type_, kind, copy.deepcopy(obj)))
        self.cond.notify_all()

    def create(self, kind: Kind, ns: str, obj: Obj) -> Obj:
        with self.cond:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            name = meta.get("name")
            if not name:
                raise ApiError(422, "Invalid", f"{kind.kind}: metadata.name: Required value")
            if kind.namespaced:
                meta["namespace"] = ns = meta.get("namespace") or ns
                namespace = self._bucket(self.kinds[("", "v1", "namespaces")]).get(("", ns))
                if namespace is None:
                    raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
                if namespace["metadata"].get("deletionTimestamp"):
                    raise ApiError(403, "Forbidden", f'unable to create new content in namespace '
                                                     f'{ns} because it is being terminated')
            else:
                ns = ""
                meta.pop("namespace", None)
            if (ns, name) in self._bucket(kind):
                raise ApiError(409, "AlreadyExists",
                               f'{kind.plural} "{name}" already exists')
            obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            self._defaults(kind, obj)
            self._bucket(kind)[(ns, name)] = obj
            self.changed_at[meta["uid"]] = time.monotonic()
            if kind.kind == "CustomResourceDefinition":
                self._serve_crd(obj)
            self._record("ADDED", kind, obj)
            return copy.deepcopy(obj)

    def replace(self, kind: Kind, ns: str, name: str, new: Obj, *, status_only: bool = False,
                rv_check: bool = True) -> Obj:
        with self.cond:
            key = (ns if kind.namespaced else "", name)
            old = self._bucket(kind).get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
            want_rv = (new.get("metadata") or {}).get("resourceVersion")
            if rv_check and want_rv and want_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.plural} '
                                                f'"{name}": the object has been modified')
            new = copy.deepcopy(new)
            if kind.kind == "Secret" and new.get("stringData"):
                self._defaults(kind, new)  # stringData is written into data on every write
            if status_only:
                merged = {**old, "status": new.get("status", {})}
            else:
                merged = {**new, "status": old.get("status", new.get("status", {}))}
                if "status" not in old and "status" not in new:
                    merged.pop("status")
            meta = merged.setdefault("metadata", {})
            for k in ("uid", "creationTimestamp", "generation", "namespace"):
                if k in old["metadata"]:
                    meta[k] = old["metadata"][k]
            merged["apiVersion"], merged["kind"] = kind.api_version, kind.kind
            if old["metadata"].get("deletionTimestamp"):
                meta["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
            if self._spec(merged) != self._spec(old):
                meta["generation"] = old["metadata"].get("generation", 1) + 1
                self.changed_at[meta["uid"]] = time.monotonic()
            self._bucket(kind)[key] = merged
            self._record("MODIFIED", kind, merged)
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self._remove(kind, key[0], name)  # the last finalizer is gone
            return copy.deepcopy(merged)

    def patch(self, kind: Kind, ns: str, name: str, content_type: str, body: Any,
              manager: str = "unknown", force: bool = False, status_only: bool = False) -> Obj:
        with self.cond:
            key = (ns if kind.namespaced else "", name)
            old = self._bucket(kind).get(key)
            if "apply-patch" in content_type:
                applied_key = (kind.plural, key, manager, status_only)
                if old is None:
                    created = self.create(kind, ns, body)
                    self.applied[applied_key] = copy.deepcopy(body)
                    return created
                base = prune_applied(old, self.applied.get(applied_key, {}), body)
                result = apply_merge(base, body)
                self.applied[applied_key] = copy.deepcopy(body)
            elif old is None:
                raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
            elif "json-patch" in content_type:
                result = json_patch(old, body)
            elif "strategic-merge-patch" in content_type:
                result = strategic_merge_patch(old, body)
            else:
                result = merge_patch(old, body)
            result.setdefault("metadata", {}).pop("resourceVersion", None)
            return self.replace(kind, ns, name, result, status_only=status_only, rv_check=False)

    def delete(self, kind: Kind, ns: str, name: str) -> Obj:
        with self.cond:
            key = (ns if kind.namespaced else "", name)
            obj = self._bucket(kind).get(key)
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
            if not obj["metadata"].get("finalizers"):
                return self._remove(kind, ns, name)
            if not obj["metadata"].get("deletionTimestamp"):  # marked, kept for its finalizers
                obj["metadata"]["deletionTimestamp"] = _now()
                if kind.kind == "Namespace":
                    obj["status"] = {"phase": "Terminating"}
                self._record("MODIFIED", kind, obj)
                self._collect(kind, obj)
            return copy.deepcopy(obj)

    def _remove(self, kind: Kind, ns: str, name: str) -> Obj:
        with self.cond:
            obj = self._bucket(kind).pop((ns if kind.namespaced else "", name))
            self._record("DELETED", kind, obj)
            self.applied = {k: v for k, v in self.applied.items()
                            if not (k[0] == kind.plural and k[1] == (ns, name))}
            self._collect(kind, obj)
            return obj

    def _collect(self, kind: Kind, obj: Obj) -> None:
        """Garbage collection: delete what ``obj`` owns (and, for a namespace, holds)."""
        uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
        for other_kind in list(self.kinds.values()):
            for (o_ns, o_name), other in list(self._bucket(other_kind).items()):
                owners = other["metadata"].get("ownerReferences") or []
                in_ns = kind.kind == "Namespace" and o_ns == name
                if (in_ns or any(o.get("uid") == uid for o in owners)) and \
                        (o_ns, o_name) in self._bucket(other_kind):
                    self.delete(other_kind, o_ns, o_name)

    # -- kind-specific behaviour of the real control plane -----------------------------------

    @staticmethod
    def _spec(obj: Obj) -> Any:
        return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

    def _defaults(self, kind: Kind, obj: Obj) -> None:
        if kind.kind == "Namespace":
            obj["status"] = {"phase": "Active"}
        elif kind.kind == "Service":
            spec = obj.setdefault("spec", {})
            if spec.get("clusterIP") != "None":
                n = len(self._bucket(kind)) + 10
                spec["clusterIP"] = f"fake-cluster-ip-{n}"
            spec.setdefault("type", "ClusterIP")
        elif kind.kind == "Secret" and obj.get("stringData"):
            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(v.encode()).decode()

    def _serve_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        for version in spec.get("versions", []):
            kind = Kind(spec["group"], version["name"], spec["names"]["kind"],
                        spec["names"]["plural"], spec.get("scope", "Namespaced") == "Namespaced")
            self.kinds[(kind.group, kind.version, kind.plural)] = kind
        crd["status"] = {"conditions": [{"type": "Established", "status": "True"},
                                        {"type": "NamesAccepted", "status": "True"}],
                         "acceptedNames": spec["names"]}

    def reconcile(self) -> None:
        """One pass of the fake controllers: objects whose spec settled ``ready_delay`` ago get
        the status their real controller would report."""
        now = time.monotonic()
        with self.cond:
            for kind in list(self.kinds.values()):
                rule = STATUS_RULES.get(kind.kind)
                if rule is None or kind.kind in self.stalled_kinds:
                    continue
                for obj in list(self._bucket(kind).values()):
                    changed = self.changed_at.get(obj["metadata"]["uid"], 0.0)
                    if now - changed < self.ready_delay:
                        continue
                    status = rule(self, obj)
                    if status != obj.get("status"):
                        obj["status"] = status
                        self._record("MODIFIED", kind, obj)


def _replicas(obj: Obj) -> int:
    return int(obj.get("spec", {}).get("replicas", 1))


def _deployment(store: Store, obj: Obj) -> Obj:
    n, gen = _replicas(obj), obj["metadata"]["generation"]
    return {"observedGeneration": gen, "replicas": n, "updatedReplicas": n, "readyReplicas": n,
            "availableReplicas": n, "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}


def _statefulset(store: Store, obj: Obj) -> Obj:
    n, gen = _replicas(obj), obj["metadata"]["generation"]
    revision = f"{obj['metadata']['name']}-{gen}"
    return {"observedGeneration": gen, "replicas": n, "readyReplicas": n, "currentReplicas": n,
            "updatedReplicas": n, "availableReplicas": n, "currentRevision": revision,
            "updateRevision": revision}


def _daemonset(store: Store, obj: Obj) -> Obj:
    selector = obj.get("spec", {}).get("template", {}).get("spec", {}).get("nodeSelector") or {}
    nodes, _ = store.list(store.kinds[("", "v1", "nodes")], None)
    n = sum(1 for node in nodes if all(
        (node["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items()))
    return {"observedGeneration": obj["metadata"]["generation"], "desiredNumberScheduled": n,
            "currentNumberScheduled": n, "updatedNumberScheduled": n, "numberReady": n,
            "numberAvailable": n, "numberMisscheduled": 0}


def _pod(store: Store, obj: Obj) -> Obj:
    kept = {k: v for k, v in (obj.get("status") or {}).items() if k in ("podIP", "podIPs", "hostIP")}
    if obj.get("spec", {}).get("restartPolicy") in ("Never", "OnFailure"):
        return {**kept, "phase": "Succeeded", "conditions": [
            {"type": "Ready", "status": "False", "reason": "PodCompleted"}]}
    return {**kept, "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}


def _pdb(store: Store, obj: Obj) -> Obj:
    return {"observedGeneration": obj["metadata"]["generation"], "currentHealthy": 1,
            "desiredHealthy": 0, "disruptionsAllowed": 1, "expectedPods": 1}


def _job(store: Store, obj: Obj) -> Obj:
    return {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}


STATUS_RULES: dict[str, Callable[[Store, Obj], Obj]] = {
    "Deployment": _deployment,
    "StatefulSet": _statefulset,
    "ReplicaSet": _deployment,
    "DaemonSet": _daemonset,
    "Pod": _pod,
    "PersistentVolumeClaim": lambda store, obj: {"phase": "Bound"},
    "PodDisruptionBudget": _pdb,
    "Job": _job,
}
