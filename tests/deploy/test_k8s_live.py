"""The live path of ``weightship deploy``: preflight, install, upgrade, rollout wait, rollback,
uninstall, each preflight failure, driven by Helm's own Go client (helm-python-sdk) and the
``kubernetes`` client against the fake API server of ``fakekube.py`` (the one mock here)."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import helm_python
import pytest
from fakekube import FakeKube
from k8s_helpers import default_storage_class, gpu_node, namespace, secret

from weightship.deploy.k8s import preflight
from weightship.deploy.k8s.cluster import connect
from weightship.deploy.k8s.deployer import plan

TINY = ["weightship-tiny", "--release", "demo", "-n", "ml", "--timeout", "30"]


def config_map(name: str, ns: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
            "data": data}


def release_records(fake: FakeKube, ns: str = "ml") -> list[dict[str, Any]]:
    """Helm's release records, decoded as ``helm`` itself reads them."""
    out = []
    for s in fake.objects("v1", "Secret", ns):
        if s.get("type") == "helm.sh/release.v1":
            blob = base64.b64decode(base64.b64decode(s["data"]["release"]))
            out.append({"labels": s["metadata"]["labels"],
                        "release": json.loads(gzip.decompress(blob))})
    return sorted(out, key=lambda r: int(r["labels"]["version"]))


def the(fake: FakeKube, api_version: str, kind: str, ns: str = "ml") -> dict[str, Any]:
    (obj,) = fake.objects(api_version, kind, ns)
    return obj


def test_install_upgrade_rollback_uninstall(cluster: FakeKube, cli: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli("deploy", "k8s", *TINY, capsys=capsys)
    assert code == 0, err
    assert "release demo revision 1 in ml: deployed, ready" in out
    assert "kubectl -n ml port-forward svc/demo-weightship" in out  # the chart's NOTES
    (record,) = release_records(cluster)
    assert record["labels"] == {**record["labels"], "owner": "helm", "name": "demo",
                                "status": "deployed", "version": "1"}
    assert record["release"]["chart"]["metadata"]["name"] == "weightship"
    deployment = the(cluster, "apps/v1", "Deployment")
    assert deployment["status"]["readyReplicas"] == 1  # waited for the rollout
    serve = deployment["spec"]["template"]["spec"]["containers"][0]
    assert serve["args"][:2] == ["serve", "/models/weightship-tiny"]
    key = next(
        s for s in cluster.objects("v1", "Secret", "ml")
        if s["metadata"]["name"] == "demo-weightship-api-key")["data"]["api-key"]

    # Helm itself sees the same release (what `helm status demo -n ml` prints).
    with helm_python.Config(namespace="ml", kubeconfig_path=_kubeconfig()) as helm:
        assert helm.status("demo")["status"] == "deployed"

    code, out, err = cli("deploy", "k8s", *TINY, "--set", "replicaCount=2", capsys=capsys)
    assert code == 0, err
    assert "revision 2" in out
    deployment = the(cluster, "apps/v1", "Deployment")
    assert deployment["spec"]["replicas"] == 2 and deployment["status"]["readyReplicas"] == 2
    assert next(s for s in cluster.objects("v1", "Secret", "ml")
                if s["metadata"]["name"] == "demo-weightship-api-key")["data"]["api-key"] == key

    code, out, err = cli("--json", "deploy", "status", "demo", "-n", "ml", capsys=capsys)
    assert code == 0, err
    status = json.loads(out)
    assert status["revision"] == 2 and status["status"] == "deployed"
    assert status["workloads"] == [{"kind": "Deployment", "name": "demo-weightship", "ready": 2,
                                    "desired": 2, "exists": True}]
    assert [h["status"] for h in status["history"]] == ["superseded", "deployed"]

    code, out, err = cli("deploy", "rollback", "demo", "1", "-n", "ml", capsys=capsys)
    assert code == 0, err
    assert "rolled back to revision 1: now revision 3, deployed" in out
    assert the(cluster, "apps/v1", "Deployment")["spec"]["replicas"] == 1

    code, out, err = cli("deploy", "rollback", "demo", "9", "-n", "ml", capsys=capsys)
    assert code == 1 and "has no revision 9" in err and "revisions: 1, 2, 3" in err

    code, out, err = cli("deploy", "uninstall", "demo", "-n", "ml", capsys=capsys)
    assert code == 0, err
    assert cluster.objects("apps/v1", "Deployment", "ml") == []
    assert cluster.objects("v1", "Secret", "ml") == []  # records and the generated key

    code, out, err = cli("deploy", "status", "demo", "-n", "ml", capsys=capsys)
    assert code == 1 and "no release 'demo' in namespace 'ml'" in err


def _kubeconfig() -> str:
    import os

    return os.environ["KUBECONFIG"]


def test_a_rollout_that_never_gets_ready_times_out_and_can_be_retried(
        cluster: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cluster.store.stalled_kinds.add("Deployment")
    code, _out, err = cli("deploy", "k8s", *TINY[:-1], "2", capsys=capsys)
    assert code == 1
    assert "did not become ready within 2s" in err and "kubectl -n ml get pods" in err
    assert release_records(cluster)[-1]["labels"]["status"] == "failed"

    cluster.store.stalled_kinds.clear()
    code, _out, err = cli("deploy", "k8s", *TINY, capsys=capsys)
    assert code == 0, err
    assert [r["labels"]["status"] for r in release_records(cluster)] == ["superseded", "deployed"]


def test_no_wait_returns_before_the_rollout(cluster: FakeKube, cli: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cluster.store.stalled_kinds.add("Deployment")
    code, out, err = cli("deploy", "k8s", *TINY, "--no-wait", capsys=capsys)
    assert code == 0, err
    assert "applied (not waited for)" in out
    assert "readyReplicas" not in the(cluster, "apps/v1", "Deployment").get("status", {})


def test_stateful_p2p_release_waits_for_every_workload_and_passes_helm_test(
        cluster: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = cli("deploy", "k8s", "weightship-tiny", "-r", "p2p", "-n", "ml",
                         "--set", "storage.mode=perPodPVC", "--set", "p2p.enabled=true",
                         "--timeout", "30", capsys=capsys)
    assert code == 0, err
    assert the(cluster, "apps/v1", "StatefulSet")["status"]["readyReplicas"] == 1
    assert the(cluster, "apps/v1", "DaemonSet")["status"]["numberReady"] == 2  # two GPU nodes
    with helm_python.Config(namespace="ml", kubeconfig_path=_kubeconfig()) as helm:
        result = helm.test("p2p", timeout=30)
    assert result["release"]["status"] == "deployed"


def test_dry_run_needs_no_cluster(cli: Any, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    code, out, err = cli("deploy", "k8s", "mistral-7b-v0.1", "-n", "ml", "--dry-run",
                         capsys=capsys)
    assert code == 0, err
    assert out.startswith("---\n# Source: weightship/templates/deployment.yaml")
    assert "kind: Deployment" in out and "nvidia.com/gpu: 1" in out
    assert "kind: NetworkPolicy" in out  # on by default, and through the same checks
    assert "restricted Pod Security Standard" in err


def test_an_unreachable_cluster_is_one_clear_line(cli: Any, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Any) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    with_closed_port = FakeKube()  # bound, never started: connections are refused
    kubeconfig.write_text(with_closed_port.kubeconfig())
    with_closed_port.stop()
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    code, _out, err = cli("deploy", "k8s", *TINY, capsys=capsys)
    assert code == 1
    assert err.startswith("error: cannot reach the Kubernetes API")
    assert "Traceback" not in err


def test_a_preflight_failure_installs_nothing(cluster: FakeKube, cli: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = cli("deploy", "k8s", *TINY, "--set", "fetch.hfToken.existingSecret=hf",
                         capsys=capsys)
    assert code == 1
    assert "preflight check(s) failed: Secret 'hf'" in err
    assert release_records(cluster) == [] and cluster.objects("apps/v1", "Deployment", "ml") == []


# ---- each preflight check --------------------------------------------------------------------

MISTRAL, TINY_MODEL = "mistral-7b-v0.1", "weightship-tiny"
PREFLIGHT = [
    ("namespace", [], TINY_MODEL, [], "nowhere", "namespace 'nowhere' does not exist"),
    ("no-gpus", [gpu_node("cpu-1", gpus=0)], TINY_MODEL, [], "ml",
     "no schedulable node has allocatable nvidia.com/gpu"),
    ("gpu-too-small", [gpu_node("t4", memory_mib=15360)], MISTRAL, [], "ml",
     "needs 24410 MiB of GPU memory but the largest GPU has 15360 MiB"),
    ("no-memory-label", [gpu_node("g", memory_mib=None)], MISTRAL, [], "ml",
     "needs the nvidia.com/gpu.memory node label"),
    ("not-enough-gpus", [gpu_node("g")], TINY_MODEL, ["replicaCount=3"], "ml",
     "replicaCount=3 but the GPU nodes hold only 1 pod(s)"),
    ("node-selector", [gpu_node("g")], TINY_MODEL, ["nodeSelector.pool=a100"], "ml",
     "no GPU node matches nodeSelector"),
    ("missing-secret", [gpu_node("g")], TINY_MODEL, ["fetch.aws.existingSecret=s3"], "ml",
     "Secret 's3' (needed by Deployment/demo-weightship container fetch env AWS_ACCESS_KEY_ID)"),
    ("missing-key", [gpu_node("g"), secret("hf", "ml", token="x")], TINY_MODEL,
     ["fetch.hfToken.existingSecret=hf"], "ml", "Secret 'hf' has no key 'HF_TOKEN'"),
    ("missing-api-key-secret", [gpu_node("g")], TINY_MODEL, ["apiKey.existingSecret=keys"],
     "ml", "Secret 'keys' (needed by Deployment/demo-weightship volume api-key)"),
    ("missing-trust-key", [gpu_node("g")], TINY_MODEL, ["fetch.trustKey.configMap=models-key"],
     "ml", "ConfigMap 'models-key' (needed by Deployment/demo-weightship volume trust-key) does "
           "not exist in namespace ml"),
    ("trust-key-not-in-config-map", [gpu_node("g"), config_map("models-key", "ml", **{"a.pub": "x"})],
     TINY_MODEL, ["fetch.trustKey.configMap=models-key"], "ml",
     "ConfigMap 'models-key' has no key 'trust.pub' (needed by Deployment/demo-weightship volume "
     "trust-key); it has: a.pub"),
    ("missing-trust-key-secret", [gpu_node("g")], TINY_MODEL, ["fetch.trustKey.secret=models-key"],
     "ml", "Secret 'models-key' (needed by Deployment/demo-weightship volume trust-key)"),
    ("storage-class", [gpu_node("g"), default_storage_class()], TINY_MODEL,
     ["storage.mode=sharedPVC", "storage.storageClassName=fast"], "ml",
     "StorageClass 'fast' does not exist (available: standard)"),
    ("no-default-class", [gpu_node("g")], TINY_MODEL, ["storage.mode=perPodPVC"], "ml",
     "the cluster has no default one"),
    ("claim-not-rwx", [gpu_node("g"), {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "models", "namespace": "ml"},
        "spec": {"accessModes": ["ReadWriteOnce"]}}], TINY_MODEL,
     ["storage.mode=sharedPVC", "storage.existingClaim=models"], "ml", "is not ReadWriteMany"),
    ("p2p-no-gpu-label", [gpu_node("g", memory_mib=None)], TINY_MODEL,
     ["p2p.enabled=true", "gpu.minMemoryMiB=0"], "ml",
     "the seeders run only on GPU nodes labelled nvidia.com/gpu.count, and no GPU node has"),
    ("runtime-class", [gpu_node("g")], TINY_MODEL, ["gpu.runtimeClassName=nvidia"], "ml",
     "RuntimeClass 'nvidia' does not exist"),
    ("service-monitor", [gpu_node("g")], TINY_MODEL, ["metrics.serviceMonitor.enabled=true"],
     "ml", "does not serve ServiceMonitor (monitoring.coreos.com/v1): install the Prometheus"),
]


@pytest.mark.parametrize(("case", "seed", "model", "sets", "ns", "message"), PREFLIGHT,
                         ids=[p[0] for p in PREFLIGHT])
def test_each_preflight_failure_says_what_to_fix(bare_cluster: FakeKube, case: str,
                                                 seed: list[dict[str, Any]], model: str,
                                                 sets: list[str], ns: str, message: str) -> None:
    bare_cluster.seed(namespace("ml"))
    for obj in seed:
        bare_cluster.seed(obj)
    p = plan(model, release="demo", namespace=ns, sets=sets)
    failures = preflight.check(connect(), ns, p.effective, p.rendered.objects)
    assert len(failures) == 1 and message in failures[0], failures


def test_preflight_passes_once_the_cluster_has_what_was_missing(bare_cluster: FakeKube) -> None:
    bare_cluster.seed(namespace("ml"))
    bare_cluster.seed(gpu_node("g"))
    p = plan(TINY_MODEL, release="demo", namespace="ml",
             sets=["metrics.serviceMonitor.enabled=true", "fetch.hfToken.existingSecret=hf",
                   "fetch.trustKey.configMap=models-key"])
    assert len(preflight.check(connect(), "ml", p.effective, p.rendered.objects)) == 3
    bare_cluster.seed(secret("hf", "ml", HF_TOKEN="hf_x"))
    bare_cluster.seed(config_map("models-key", "ml", **{"trust.pub": "-----BEGIN PUBLIC KEY-----"}))
    bare_cluster.seed({  # the Prometheus operator's CRD: the fake then serves the new kind
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
                 "versions": [{"name": "v1", "served": True, "storage": True}]}})
    assert preflight.check(connect(), "ml", p.effective, p.rendered.objects) == []


def test_node_cache_is_refused_where_the_namespace_enforces_restricted(
        bare_cluster: FakeKube) -> None:
    bare_cluster.seed(namespace("ml", **{"pod-security.kubernetes.io/enforce": "restricted"}))
    bare_cluster.seed(gpu_node("g"))
    p = plan(TINY_MODEL, release="demo", namespace="ml",
             sets=["storage.mode=nodeCache", "storage.nodeCache.hostPathAcknowledged=true"])
    assert p.accepted  # the user opted in to the hostPath ...
    failures = preflight.check(connect(), "ml", p.effective, p.rendered.objects)
    assert failures == ["namespace ml enforces the 'restricted' Pod Security Standard, which "
                        "rejects the hostPath volume of storage.mode=nodeCache"]  # ... the cluster didn't
