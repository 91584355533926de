"""Instances on Kubernetes: one namespace, its guard rails and one Helm release per company.

What an instance owns is listed in :mod:`weightship.instances.k8s_objects`. The cluster is the
record: what ``create`` was asked (model, GPUs, replicas, host, the user's chart values) is kept
in the namespace's annotations, and every later command plans the release again from them, so
nothing lives on the operator's machine.

Steps of :meth:`K8sTarget.create`, none of which writes before the checks pass:
1. render and check the release and the instance's own objects (as ``--dry-run`` prints them);
2. preflight: the instance does not exist; nodes are tainted ``weightship.io/dedicated=NAME``
   and none of them is labelled for another instance; the chart's own preflight (GPUs, storage,
   Secrets) against those nodes;
3. label the tainted nodes ``weightship.io/dedicated=NAME`` (what the pods' nodeSelector names),
   create the namespace, LimitRange, ResourceQuota, NetworkPolicy and Secrets;
4. install the release and wait for its pods to turn ready.

The record (:mod:`.k8s_record`) and the instance's Secrets and server pods (keys, usage:
:mod:`.k8s_servers`) live in modules of their own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from weightship.deploy.k8s import deployer, policy, preflight
from weightship.deploy.k8s.cluster import Cluster, connect
from weightship.deploy.k8s.release import Releases
from weightship.deploy.k8s.values import Values, compose, load_value_files, parse_sets
from weightship.errors import (
    InstanceError,
    InstanceExistsError,
    InstanceLeftoversError,
    InstanceNotFoundError,
    PreflightError,
    ReleaseError,
    ReleaseNotFoundError,
    RenderedObjectsRejectedError,
    UpgradeRolledBackError,
    UsageError,
)
from weightship.instances import k8s_objects as objs
from weightship.instances import k8s_servers as servers
from weightship.instances.k8s_record import Record, dedicated_nodes, labelled
from weightship.instances.keys import OPERATOR_KEY
from weightship.instances.target import Info, InstanceSpec, UsageRead, check_name
from weightship.runtime.keys import KeyFile, utc_now

log = logging.getLogger(__name__)
Obj = dict[str, Any]
Objs = list[Obj]  # (the class below has a method called list)
Lines = list[str]
SELECTOR = "app.kubernetes.io/managed-by=weightship," + objs.INSTANCE


class K8sTarget:
    """Instances in the cluster of a kubeconfig context (see the module docstring)."""

    kind = "k8s"

    def __init__(self, *, context: str | None = None, chart: Path | None = None,
                 value_files: tuple[Path, ...] = (), sets: tuple[str, ...] = (),
                 allow_from: tuple[str, ...] = ("ingress-nginx",),
                 admin_from: tuple[str, ...] | None = None,
                 keys_wait: float = servers.KEYS_WAIT,
                 usage_window: tuple[datetime | None, datetime | None] = (None, None)) -> None:
        self.context, self.chart = context, chart
        self.usage_window = usage_window  # [since, until) of the usage records to read
        self.keys_wait = keys_wait  # seconds for every server to load a new key file
        self.value_files, self.sets = value_files, sets
        self.allow_from, self.admin_from = list(allow_from), admin_from
        self._cluster: Cluster | None = None
        self._key_versions: dict[str, str] = {}

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            self._cluster = connect(self.context)
        return self._cluster

    # -- planning (no cluster) ------------------------------------------------------------------

    def _user_values(self) -> Values:
        return compose({}, load_value_files(self.value_files), parse_sets(self.sets))

    def _plan(self, name: str, record: Record, *, upgrade: bool = False) -> deployer.Plan:
        user = record.user_values
        mode = (user.get("storage") or {}).get("mode", "perPodPVC")
        if mode not in ("perPodPVC", "sharedPVC"):
            raise UsageError(f"storage.mode={mode} cannot hold an instance's weights across a "
                             "pause (and nodeCache breaks restricted Pod Security)",
                             hint="use perPodPVC (the default) or sharedPVC")
        serve = user.get("serve") or {}
        overrides = deployer.merge(user, objs.chart_overrides(
            name, replicas=0 if record.paused else record.replicas, gpus=record.gpus,
            host=record.host, tls_secret=record.tls_secret, version=record.version,
            storage_mode=mode, allow_from=record.allow_from, admin_from=record.admin_from))

        def plan(values: Values) -> deployer.Plan:
            return deployer.plan(record.model, release=name, namespace=objs.namespace_of(name),
                                 chart=self.chart, gpus=record.gpus, dtype=serve.get("dtype"),
                                 max_batch=serve.get("maxBatch"),
                                 max_model_len=serve.get("maxModelLen"), is_upgrade=upgrade,
                                 overrides=values)

        p = plan(overrides)
        wanted = str((p.values.get("storage") or {}).get("size") or "")
        if record.volume and wanted != record.volume:
            # a StatefulSet's claim templates (and a bound claim) keep the size they were made with
            if objs.quantity(wanted) > objs.quantity(record.volume):
                raise UsageError(f"{record.model} needs volumes of {wanted}, but instance {name}'s "
                                 f"claims hold {record.volume}",
                                 hint="create a new instance for this model")
            p = plan(deployer.merge(overrides, {"storage": {"size": record.volume}}))
        return p

    def _own_objects(self, name: str, record: Record, p: deployer.Plan, keys_text: str,
                     operator_key: str, floor: dict[str, Any] | None = None) -> Objs:
        gpu = (p.effective.get("gpu") or {}).get("resourceName", "nvidia.com/gpu")
        out = [objs.namespace(name, record.annotations()), objs.limit_range(name),
               objs.quota(name, p.rendered.objects + p.rendered.hooks, gpu_resource=gpu,
                          floor=floor),
               objs.default_deny(name), objs.keys_secret(name, keys_text),
               objs.operator_secret(name, operator_key)]
        problems, _ = policy.schema_problems(out, ("1.33.0",))
        if problems:
            raise RenderedObjectsRejectedError(problems)
        return out

    def _new_record(self, spec: InstanceSpec, admin_from: list[str]) -> Record:
        return Record(model=spec.model, gpus=spec.gpus, replicas=spec.replicas, host=spec.host,
                      tls_secret=spec.tls_secret, version=spec.version, created=utc_now(),
                      user_values=self._user_values(), allow_from=self.allow_from,
                      admin_from=admin_from)

    def plan(self, spec: InstanceSpec) -> Objs:
        record = self._new_record(spec, list(self.admin_from or ()))
        p = self._plan(spec.name, record)
        own = self._own_objects(spec.name, record, p, KeyFile(spec.name).to_text(),
                                "(generated by instance create)")
        return own + p.rendered.objects + p.rendered.hooks

    # -- reading the cluster --------------------------------------------------------------------

    def _namespace(self, name: str) -> dict[str, Any]:
        check_name(name)
        ns = self.cluster.get(f"/api/v1/namespaces/{objs.namespace_of(name)}")
        labels = (ns or {}).get("metadata", {}).get("labels") or {}
        if ns is None or labels.get(objs.INSTANCE) != name:
            raise InstanceNotFoundError(name, f"in the cluster (no namespace {objs.namespace_of(name)})")
        return ns

    def _api_server_cidrs(self) -> list[str]:
        endpoints = self.cluster.get("/api/v1/namespaces/default/endpoints/kubernetes") or {}
        ips = [a["ip"] for s in endpoints.get("subsets") or [] for a in s.get("addresses") or []]
        if not ips:
            log.warning("no API server address found (endpoints default/kubernetes): "
                        "`instance usage` may be refused by the NetworkPolicy; pass --admin-from")
        return [f"{ip}/128" if ":" in ip else f"{ip}/32" for ip in ips]

    def _info(self, ns: dict[str, Any], name: str) -> Info:
        record = Record.of(ns)
        namespace = objs.namespace_of(name)
        release: dict[str, Any] = {}
        with Releases(namespace, context=self.context) as releases, contextlib.suppress(ReleaseNotFoundError):
            release = releases.status(name)
        ready = sum(w["ready"] for w in deployer.workloads(release.get("manifest", ""), namespace,
                                                           context=self.context)
                    if w["kind"] in ("StatefulSet", "Deployment")) if release else 0
        nodes = [n["metadata"]["name"]
                 for n in self.cluster.items("/api/v1/nodes", selector=f"{objs.DEDICATED}={name}")]
        scheme = "https" if record.tls_secret else "http"
        endpoint = (f"{scheme}://{record.host}" if record.host
                    else f"http://{objs.FULLNAME}.{namespace}.svc")
        return {"name": name, "target": self.kind, "namespace": namespace, "model": record.model,
                "version": record.version or release.get("app_version"),
                "replicas": record.replicas, "ready": ready, "paused": record.paused,
                "gpus": record.gpus, "endpoint": endpoint, "created": record.created,
                "release": {"revision": release.get("revision"),
                            "status": release.get("status") or "missing"},
                "nodes": nodes}

    def list(self) -> Objs:
        out = []
        for ns in self.cluster.items("/api/v1/namespaces", selector=SELECTOR):
            name = ns["metadata"]["labels"][objs.INSTANCE]
            out.append(self._info(ns, name))
        return sorted(out, key=lambda i: i["name"])

    def show(self, name: str) -> Info:
        info = self._info(self._namespace(name), name)
        info["keys"] = len([k for k in self.read_keys(name).keys if k.name != OPERATOR_KEY])
        q = self.cluster.get(f"/api/v1/namespaces/{info['namespace']}/resourcequotas/"
                             "weightship-quota") or {}
        info["quota"] = (q.get("spec") or {}).get("hard") or {}
        return info

    # -- changing it ----------------------------------------------------------------------------

    def create(self, spec: InstanceSpec, *, wait: bool, timeout: float) -> Info:
        namespace = objs.namespace_of(spec.name)
        existing = self.cluster.get(f"/api/v1/namespaces/{namespace}")
        if existing is not None:
            if (existing["metadata"].get("labels") or {}).get(objs.INSTANCE) == spec.name:
                raise InstanceExistsError(spec.name, "in the cluster")
            raise InstanceError(f"namespace {namespace} exists and is not a weightship instance",
                                hint="pick another instance name")
        admin_from = list(self.admin_from) if self.admin_from is not None else self._api_server_cidrs()
        record = self._new_record(spec, admin_from)
        p = self._plan(spec.name, record)
        record.volume = str((p.values.get("storage") or {}).get("size") or "")
        keys = KeyFile(spec.name)
        _, operator_key = keys.add(OPERATOR_KEY, scopes=("usage",))
        own = self._own_objects(spec.name, record, p, keys.to_text(), operator_key)
        nodes = self.cluster.items("/api/v1/nodes")
        mine, failures = dedicated_nodes(nodes, spec.name)
        planned_nodes = [labelled(n, spec.name) if n["metadata"]["name"] in mine else n
                         for n in nodes]
        failures += self._host_taken(spec.host)
        failures += preflight.check(self.cluster, namespace, p.effective,
                                    p.rendered.objects + own, new_namespace=own[0],
                                    nodes=planned_nodes)
        if failures:
            raise PreflightError(failures)
        try:
            for node in mine:
                self._label_node(node, spec.name)
            for obj in own:
                self.cluster.apply(obj)
            with Releases(namespace, context=self.context) as releases:
                releases.deploy(p.chart, spec.name, p.values, wait=wait, timeout=timeout,
                                description="weightship instance create")
        except (Exception, KeyboardInterrupt) as e:
            self._undo_create(spec.name, e)
            raise
        return self.show(spec.name)

    def _host_taken(self, host: str | None) -> Lines:
        """Why ``host`` cannot be this instance's: an Ingress of another instance serves it."""
        if not host:
            return []
        problems = []
        for ns in self.cluster.items("/api/v1/namespaces", selector=SELECTOR):
            other = ns["metadata"]["labels"][objs.INSTANCE]
            for ingress in self.cluster.items(f"/apis/networking.k8s.io/v1/namespaces/"
                                              f"{ns['metadata']['name']}/ingresses"):
                hosts = {str(rule.get("host") or "").lower()
                         for rule in (ingress.get("spec") or {}).get("rules") or []}
                if host.lower() in hosts:
                    problems.append(f"host {host} is already the endpoint of instance {other!r} "
                                    f"(Ingress {ns['metadata']['name']}/"
                                    f"{ingress['metadata']['name']}): pick another --host")
        return problems

    def _undo_create(self, name: str, failure: BaseException) -> None:
        """Remove what a create that failed had made, so that running it again works."""
        log.error("creating instance %s failed (%s); removing what it made", name, failure)
        try:
            leftovers = self._teardown(name, timeout=120)
        except Exception as e:
            raise InstanceError(f"creating instance {name!r} failed ({failure}), and removing "
                                f"what it made failed too ({e})",
                                hint=f"remove it: weightship instance delete {name} --yes") from e
        if leftovers:
            raise InstanceError(f"creating instance {name!r} failed ({failure}); these remain: "
                                + ", ".join(leftovers),
                                hint=f"remove them: weightship instance delete {name} --yes, or "
                                     "by hand") from failure

    def _label_node(self, node: str, value: str | None) -> None:
        self.cluster.write("PATCH", f"/api/v1/nodes/{node}",
                           {"metadata": {"labels": {objs.DEDICATED: value}}},
                           content_type="application/merge-patch+json")

    def _roll(self, name: str, record: Record, *, wait: bool, timeout: float,
              action: str) -> None:
        """Plan ``record``, widen the quota, upgrade the release (rolling back a failed
        upgrade), then set the quota and the record to what it now runs."""
        namespace = objs.namespace_of(name)
        p = self._plan(name, record, upgrade=True)
        quota_path = f"/api/v1/namespaces/{namespace}/resourcequotas/weightship-quota"
        old = self.cluster.get(quota_path) or {"spec": {"hard": {}}}
        gpu = (p.effective.get("gpu") or {}).get("resourceName", "nvidia.com/gpu")
        new = objs.quota(name, p.rendered.objects + p.rendered.hooks, gpu_resource=gpu,
                         floor=old["spec"].get("hard"))
        self.cluster.apply(objs.widest(new, old) if old["spec"]["hard"] else new)
        with Releases(namespace, context=self.context) as releases:
            before = [r for r in releases.history(name) if r.get("status") == "deployed"]
            try:
                releases.deploy(p.chart, name, p.values, wait=wait, timeout=timeout,
                                description=f"weightship instance {action}")
            except ReleaseError as e:
                if not before:
                    raise
                revision = int(before[-1]["revision"])
                releases.rollback(name, revision, wait=wait, timeout=timeout)
                raise UpgradeRolledBackError(name, action, str(e), revision) from None
        self.cluster.apply(new)
        self.cluster.write("PATCH", f"/api/v1/namespaces/{namespace}",
                           {"metadata": {"annotations": record.annotations()}},
                           content_type="application/merge-patch+json")

    def scale(self, name: str, replicas: int, *, wait: bool, timeout: float) -> Info:
        if replicas < 1:
            raise UsageError(f"--replicas must be at least 1, got {replicas}",
                             hint=f"to run none, pause it: weightship instance pause {name}")
        record = replace(Record.of(self._namespace(name)), replicas=replicas)
        self._roll(name, record, wait=wait, timeout=timeout, action="scale")
        return self.show(name)

    def upgrade(self, name: str, *, model: str | None, version: str | None, wait: bool,
                timeout: float) -> Info:
        old = Record.of(self._namespace(name))
        record = replace(old, model=model or old.model, version=version or old.version)
        self._roll(name, record, wait=wait, timeout=timeout,
                   action="upgrade")
        return self.show(name)

    def pause(self, name: str, *, wait: bool, timeout: float) -> Info:
        record = replace(Record.of(self._namespace(name)), paused=True)
        self._roll(name, record, wait=wait, timeout=timeout, action="pause")
        return self.show(name)

    def resume(self, name: str, *, wait: bool, timeout: float) -> Info:
        record = replace(Record.of(self._namespace(name)), paused=False)
        self._roll(name, record, wait=wait, timeout=timeout,
                   action="resume")
        return self.show(name)

    def delete(self, name: str, *, timeout: float) -> Info:
        self._namespace(name)
        leftovers = self._teardown(name, timeout=timeout)
        if leftovers:
            raise InstanceLeftoversError(name, leftovers)
        return {"name": name, "target": self.kind, "deleted": True,
                "namespace": objs.namespace_of(name)}

    def _teardown(self, name: str, *, timeout: float) -> Lines:
        """Remove the release, the namespace and the node labels of instance ``name``, wait up
        to ``timeout`` seconds for them to go, and return what is left: the namespace (held by
        a finalizer), a node label, or a PersistentVolume of one of its claims (a ``Retain``
        volume keeps the weights and the usage log; one that is deleted is waited for)."""
        namespace = objs.namespace_of(name)
        volumes = sorted({str((c.get("spec") or {}).get("volumeName") or "") for c in
                          self.cluster.items(f"/api/v1/namespaces/{namespace}/"
                                             "persistentvolumeclaims")} - {""})
        with Releases(namespace, context=self.context) as releases:
            if releases.history(name):
                releases.uninstall(name, wait=True, timeout=timeout)
        self.cluster.delete(f"/api/v1/namespaces/{namespace}")
        for node in self.cluster.items("/api/v1/nodes", selector=f"{objs.DEDICATED}={name}"):
            self._label_node(node["metadata"]["name"], None)
        deadline = time.monotonic() + timeout
        while True:
            ns = self.cluster.get(f"/api/v1/namespaces/{namespace}")
            kept = {v: pv for v in volumes
                    if (pv := self.cluster.get(f"/api/v1/persistentvolumes/{v}")) is not None}
            going = [v for v, pv in kept.items()
                     if (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy") != "Retain"]
            if (ns is None and not going) or time.monotonic() > deadline:
                break
            time.sleep(1)
        leftovers = []
        if ns is not None:
            held = ", ".join(ns["metadata"].get("finalizers") or []) or "its contents"
            leftovers.append(f"namespace {namespace} ({(ns.get('status') or {}).get('phase')}, "
                             f"held by {held})")
        leftovers += [f"node {n['metadata']['name']} label {objs.DEDICATED}"
                      for n in self.cluster.items("/api/v1/nodes",
                                                  selector=f"{objs.DEDICATED}={name}")]
        for volume, pv in kept.items():
            policy = (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy")
            leftovers.append(f"PersistentVolume {volume} ({policy}: it holds the weights and "
                             "the usage log)")
        return leftovers

    # -- keys and usage (k8s_servers.py) --------------------------------------------------------

    def read_keys(self, name: str) -> KeyFile:
        self._namespace(name)
        keys, self._key_versions[name] = servers.read_keys(self.cluster, name)
        return keys

    def write_keys(self, name: str, keys: KeyFile) -> None:
        servers.write_keys(self.cluster, name, keys, self._key_versions.get(name, ""),
                           wait=self.keys_wait)

    def usage_records(self, name: str) -> UsageRead:
        self._namespace(name)
        since, until = self.usage_window
        return servers.usage_records(self.cluster, name, since=since, until=until)
