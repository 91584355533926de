"""Helpers of the instance tests: the cluster as an operator prepares it for two companies,
and ``weightship instance`` run in-process (see conftest's ``cli``)."""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from fakekube import FakeKube
from k8s_helpers import default_storage_class, gpu_node, namespace

Obj = dict[str, Any]
DEDICATED = "weightship.io/dedicated"
TINY = ["--model", "weightship-tiny", "--on", "k8s", "--timeout", "30", "--json"]
API_SERVER_IP = "10.0.0.2"


def tainted_node(name: str, company: str, *, label: str | None = None, gpus: int = 1) -> Obj:
    """A GPU node as the operator leaves it for a company: tainted (and maybe labelled)."""
    n = gpu_node(name, gpus=gpus, **({DEDICATED: label} if label else {}))
    n["spec"] = {"taints": [{"key": DEDICATED, "value": company, "effect": "NoSchedule"}]}
    return n


def prepare_two_pools(fake: FakeKube) -> FakeKube:
    """A cluster with acme's two GPU nodes, globex's one, an untainted shared GPU node, a
    default StorageClass, and the API server's endpoints."""
    for ns in ("default", "kube-system", "ingress-nginx"):
        fake.seed(namespace(ns))
    fake.seed({"apiVersion": "v1", "kind": "Endpoints",
               "metadata": {"name": "kubernetes", "namespace": "default"},
               "subsets": [{"addresses": [{"ip": API_SERVER_IP}],
                            "ports": [{"name": "https", "port": 6443}]}]})
    fake.seed(tainted_node("acme-1", "acme"))
    fake.seed(tainted_node("acme-2", "acme"))
    fake.seed(tainted_node("globex-1", "globex"))
    fake.seed(gpu_node("shared-1"))
    fake.seed(default_storage_class())
    return fake


def run_ok(cli: Any, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = cli("instance", *args, capsys=capsys)
    assert code == 0, err
    return json.loads(out) if "--json" in args else out


def refused(cli: Any, capsys: pytest.CaptureFixture[str], *args: str, code: int = 1) -> str:
    """A one-line error (plus a hint), the given exit code, nothing on stdout."""
    got, out, err = cli("instance", *args, capsys=capsys)
    assert got == code, (got, out, err)
    assert out == "" and "Traceback" not in err
    assert err.startswith("error: ") and len([line for line in err.splitlines()
                                              if line.startswith("error:")]) == 1, err
    return err


def objects(fake: FakeKube, api_version: str, kind: str, ns: str) -> list[Obj]:
    return fake.objects(api_version, kind, ns)


def the(fake: FakeKube, api_version: str, kind: str, ns: str, name: str | None = None) -> Obj:
    found = [o for o in objects(fake, api_version, kind, ns)
             if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def secret_text(fake: FakeKube, ns: str, name: str, key: str) -> str:
    return base64.b64decode(the(fake, "v1", "Secret", ns, name)["data"][key]).decode()


def cluster_state(fake: FakeKube) -> Any:
    """Everything a refused command must leave as it was: namespaces, node labels, releases."""
    return (sorted(n["metadata"]["name"] for n in fake.objects("v1", "Namespace")),
            {n["metadata"]["name"]: n["metadata"].get("labels") for n in fake.objects("v1", "Node")},
            sorted(s["metadata"]["name"] for s in fake.objects("v1", "Secret")))


def seed_server_pod(fake: FakeKube, instance: str, name: str, port: int) -> None:
    """A ready server pod of ``instance`` at 127.0.0.1:``port``, as the StatefulSet controller
    and the kubelet leave it."""
    fake.seed({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": f"wsi-{instance}", "labels": {
            "app.kubernetes.io/instance": instance, "app.kubernetes.io/component": "server"}},
        "spec": {"containers": [{"name": "serve", "image": "x",
                                 "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]}})


class SecretVolume:
    """What the kubelet does for one pod's Secret volume: the file ``path`` holds the Secret's
    ``key`` as it is in the cluster, replaced atomically when it changes (``synced`` cleared: a
    kubelet that has not synced that pod yet)."""

    def __init__(self, fake: FakeKube, namespace: str, secret: str, key: str, path: Path) -> None:
        self.fake, self.namespace, self.secret, self.key, self.path = fake, namespace, secret, key, path
        self.synced = threading.Event()
        self.synced.set()
        self._stop = threading.Event()
        self._sync()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sync(self) -> None:
        text = secret_text(self.fake, self.namespace, self.secret, self.key)
        if not self.path.exists() or self.path.read_text() != text:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            if self.synced.is_set():
                self._sync()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
