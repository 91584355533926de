"""``weightship instance`` on Kubernetes, against the fake API server (the one mock: Helm's own Go
client and the ``kubernetes`` client drive it as they would a cluster): two companies on one
cluster, each on its own tainted GPU nodes; what each instance owns; the refusals that change
nothing; pause, resume, scale, an upgrade that rolls back, keys, delete."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from fakekube import FakeKube
from instance_helpers import (
    API_SERVER_IP,
    DEDICATED,
    TINY,
    cluster_state,
    objects,
    refused,
    run_ok,
    secret_text,
    tainted_node,
    the,
)
from netpol import Endpoint, admits, nodes_for, pod_of

from tests.net import wait_until


def test_two_companies_each_on_their_own_nodes(two_pools: FakeKube, cli: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    acme = run_ok(cli, capsys, "create", "acme", *TINY, "--host", "api.acme.example",
                  "--tls-secret", "acme-tls")
    globex = run_ok(cli, capsys, "create", "globex", *TINY)
    assert acme["ready"] == 1 and acme["paused"] is False
    assert acme["endpoint"] == "https://api.acme.example"
    assert sorted(acme["nodes"]) == ["acme-1", "acme-2"] and globex["nodes"] == ["globex-1"]

    for name in ("acme", "globex"):
        ns = f"wsi-{name}"
        labels = the(two_pools, "v1", "Namespace", "", ns)["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "weightship"
        assert labels["weightship.io/instance"] == name
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        quota = the(two_pools, "v1", "ResourceQuota", ns)["spec"]["hard"]
        assert quota["requests.nvidia.com/gpu"] == "1" and quota["pods"] == "2"  # + helm test pod
        assert quota["services.loadbalancers"] == "0" and quota["services.nodeports"] == "0"
        assert {"requests.memory", "limits.memory", "requests.cpu", "persistentvolumeclaims",
                "requests.storage"} <= set(quota)
        limits = the(two_pools, "v1", "LimitRange", ns)["spec"]["limits"][0]
        assert limits["type"] == "Container" and "defaultRequest" in limits
        deny = the(two_pools, "networking.k8s.io/v1", "NetworkPolicy", ns,
                   "weightship-default-deny")["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
        for obj in [*objects(two_pools, "v1", "ResourceQuota", ns),
                    *objects(two_pools, "v1", "LimitRange", ns),
                    *objects(two_pools, "apps/v1", "StatefulSet", ns)]:
            assert obj["metadata"]["labels"]["weightship.io/instance"] == name, obj["kind"]
        key_file = json.loads(secret_text(two_pools, ns, "weightship-api-keys", "keys.json"))
        assert key_file["instance"] == name and "wsk_" not in json.dumps(key_file)
        records = [s for s in objects(two_pools, "v1", "Secret", ns)
                   if s.get("type") == "helm.sh/release.v1"]
        assert [r["metadata"]["labels"]["name"] for r in records] == [name]  # one release

    # The pods of each company go to its nodes only, and tolerate its taint only.
    nodes = two_pools.objects("v1", "Node")
    for name, mine in (("acme", {"acme-1", "acme-2"}), ("globex", {"globex-1"})):
        spec = the(two_pools, "apps/v1", "StatefulSet", f"wsi-{name}")["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {DEDICATED: name}
        dedicated = [t for t in spec["tolerations"] if t["key"] == DEDICATED]
        assert dedicated == [{"key": DEDICATED, "operator": "Equal", "value": name,
                              "effect": "NoSchedule"}]
        assert not any(t.get("operator") == "Exists" and not t.get("key")
                       for t in spec["tolerations"])
        assert nodes_for(spec, nodes) == mine
        for n in nodes:
            has = (n["metadata"].get("labels") or {}).get(DEDICATED)
            assert (has == name) == (n["metadata"]["name"] in mine)

    # acme's policies admit its ingress controller and the API server, nothing of globex's.
    policies = [p for ns in ("wsi-acme", "wsi-globex")
                for p in objects(two_pools, "networking.k8s.io/v1", "NetworkPolicy", ns)]
    acme_set = the(two_pools, "apps/v1", "StatefulSet", "wsi-acme")
    globex_set = the(two_pools, "apps/v1", "StatefulSet", "wsi-globex")
    acme_pod = pod_of(acme_set, "10.244.1.10", "wsi-acme")
    globex_pod = pod_of(globex_set, "10.244.2.10", "wsi-globex")
    port = acme_pod.ports["http"]
    ingress = Endpoint("10.244.9.1", "ingress-nginx", {"app": "ingress-nginx"})
    assert admits(policies, ingress, acme_pod, port)
    assert admits(policies, Endpoint(API_SERVER_IP), acme_pod, port)  # /v1/usage via pod proxy
    # nothing of one company reaches the other's pods, on any port of any protocol
    for protocol in ("TCP", "UDP", "SCTP"):
        for src, dst in ((globex_pod, acme_pod), (acme_pod, globex_pod)):
            open_ports = [p for p in range(1, 65536) if admits(policies, src, dst, p, protocol)]
            assert open_ports == [], (src.namespace, dst.namespace, protocol, open_ports[:10])
    ingress_obj = the(two_pools, "networking.k8s.io/v1", "Ingress", "wsi-acme")
    assert ingress_obj["spec"]["rules"][0]["host"] == "api.acme.example"
    assert ingress_obj["spec"]["tls"] == [{"secretName": "acme-tls", "hosts": ["api.acme.example"]}]

    listed = run_ok(cli, capsys, "list", "--json")
    assert [(i["name"], i["namespace"], i["ready"]) for i in listed] == [
        ("acme", "wsi-acme", 1), ("globex", "wsi-globex", 1)]


def test_create_is_refused_without_the_companys_nodes_and_changes_nothing(
        two_pools: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    before = cluster_state(two_pools)
    err = refused(cli, capsys, "create", "initech", *TINY)
    assert "no node is tainted weightship.io/dedicated=initech:NoSchedule" in err
    assert cluster_state(two_pools) == before

    # nodes tainted for initech, but one of them already labelled for acme
    two_pools.seed(tainted_node("initech-1", "initech"))
    two_pools.seed(tainted_node("initech-2", "initech", label="acme"))
    before = cluster_state(two_pools)
    err = refused(cli, capsys, "create", "initech", *TINY)
    assert "node initech-2 is tainted for initech but labelled for instance 'acme'" in err
    assert cluster_state(two_pools) == before


def test_bad_input_is_one_line_and_changes_nothing(two_pools: FakeKube, cli: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_ok(cli, capsys, "create", "acme", *TINY)
    before = cluster_state(two_pools)
    assert "DNS label" in refused(cli, capsys, "create", "Acme_Corp", *TINY, code=2)
    assert "at most 40" in refused(cli, capsys, "create", "a" * 41, *TINY, code=2)
    assert "already exists" in refused(cli, capsys, "create", "acme", *TINY)
    # every command that names an instance: an unknown one, and a name that is not a DNS label
    for command in (["show"], ["scale", "--replicas", "2"], ["upgrade", "--version", "9.9.9"],
                    ["pause"], ["resume"], ["delete", "--yes"], ["keys", "add", "--key-name", "ci"],
                    ["keys", "list"], ["keys", "revoke", "ci"], ["usage"]):
        at = 2 if command[0] == "keys" else 1  # where the instance's name goes
        for name, why, code in (("nope", "no instance 'nope'", 1),
                                ("Bad_Name", "must be a DNS label", 2),
                                ("../wsi-acme", "must be a DNS label", 2)):
            args = [*command[:at], name, *command[at:]]
            assert why in refused(cli, capsys, *args, code=code), args
    assert "pass --yes" in refused(cli, capsys, "delete", "acme", code=2)
    assert "upgrade needs --model or --version" in refused(cli, capsys, "upgrade", "acme", code=2)
    # a model that needs larger volumes than the instance's claims were made with
    assert "needs volumes of 18Gi, but instance acme's claims hold 2Gi" in refused(
        cli, capsys, "upgrade", "acme", "--model", "mistral-7b-v0.1", code=2)
    assert cluster_state(two_pools) == before
    run_ok(cli, capsys, "keys", "add", "acme", "--key-name", "ci", "--json")
    before = cluster_state(two_pools)
    keys_before = secret_text(two_pools, "wsi-acme", "weightship-api-keys", "keys.json")
    assert "already has a key named 'ci'" in refused(cli, capsys, "keys", "add", "acme",
                                                     "--key-name", "ci", code=2)
    assert "has no key named 'cd'" in refused(cli, capsys, "keys", "revoke", "acme", "cd", code=2)
    assert "invalid key name" in refused(cli, capsys, "keys", "add", "acme", "--key-name",
                                         "bad name", code=2)
    assert cluster_state(two_pools) == before
    assert secret_text(two_pools, "wsi-acme", "weightship-api-keys", "keys.json") == keys_before
    assert the(two_pools, "v1", "Namespace", "", "wsi-acme")


def test_keys_are_stored_as_hashes(two_pools: FakeKube, cli: Any,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    run_ok(cli, capsys, "create", "acme", *TINY)
    added = run_ok(cli, capsys, "keys", "add", "acme", "--key-name", "ci", "--json")
    assert set(added) >= {"name", "id", "key"} and added["name"] == "ci"
    assert len(added["key"]) >= 32 and added["key"].startswith("wsk_")
    stored = secret_text(two_pools, "wsi-acme", "weightship-api-keys", "keys.json")
    assert added["key"] not in stored
    assert "sha256:" + hashlib.sha256(added["key"].encode()).hexdigest() in stored

    listed = run_ok(cli, capsys, "keys", "list", "acme", "--json")
    assert [(k["name"], k["id"]) for k in listed] == [("ci", added["id"])]
    assert added["key"] not in json.dumps(listed) and "hash" not in listed[0]
    text = run_ok(cli, capsys, "keys", "list", "acme")
    assert added["key"] not in text and added["id"] in text

    run_ok(cli, capsys, "keys", "revoke", "acme", "ci")
    assert run_ok(cli, capsys, "keys", "list", "acme", "--json") == []
    assert added["id"] not in secret_text(two_pools, "wsi-acme", "weightship-api-keys", "keys.json")


def test_pause_holds_no_gpu_and_resume_keeps_the_weights(two_pools: FakeKube, cli: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_ok(cli, capsys, "create", "acme", *TINY)
    claims = the(two_pools, "apps/v1", "StatefulSet", "wsi-acme")["spec"]["volumeClaimTemplates"]
    paused = run_ok(cli, capsys, "pause", "acme", "--json")
    assert paused["paused"] is True and paused["ready"] == 0
    workload = the(two_pools, "apps/v1", "StatefulSet", "wsi-acme")
    assert workload["spec"]["replicas"] == 0
    # scaled to zero, the claims (and the verified weights on them) are kept
    assert workload["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    quota = the(two_pools, "v1", "ResourceQuota", "wsi-acme")["spec"]["hard"]
    assert quota["requests.nvidia.com/gpu"] == "0" and quota["persistentvolumeclaims"] == "1"
    assert run_ok(cli, capsys, "list", "--json")[0]["paused"] is True

    resumed = run_ok(cli, capsys, "resume", "acme", "--json")
    assert resumed["paused"] is False and resumed["ready"] == 1
    workload = the(two_pools, "apps/v1", "StatefulSet", "wsi-acme")
    assert workload["spec"]["replicas"] == 1 and workload["spec"]["volumeClaimTemplates"] == claims
    assert the(two_pools, "v1", "ResourceQuota", "wsi-acme")["spec"]["hard"][
        "requests.nvidia.com/gpu"] == "1"

    scaled = run_ok(cli, capsys, "scale", "acme", "--replicas", "2", "--json")
    assert scaled["replicas"] == 2 and scaled["ready"] == 2
    quota = the(two_pools, "v1", "ResourceQuota", "wsi-acme")["spec"]["hard"]
    assert quota["requests.nvidia.com/gpu"] == "2" and quota["pods"] == "3"


def test_a_failed_upgrade_rolls_back(two_pools: FakeKube, cli: Any,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_ok(cli, capsys, "create", "acme", *TINY)
    image = the(two_pools, "apps/v1", "StatefulSet", "wsi-acme")["spec"]["template"]["spec"][
        "containers"][0]["image"]
    two_pools.store.stalled_kinds.add("StatefulSet")  # the new pods never turn ready

    def heal_once_it_failed() -> None:  # the rollback's own wait then succeeds
        wait_until(lambda: any(
            s.get("type") == "helm.sh/release.v1" and s["metadata"]["labels"].get("status") == "failed"
            for s in two_pools.objects("v1", "Secret", "wsi-acme")), 60, "a failed revision")
        two_pools.store.stalled_kinds.discard("StatefulSet")

    healer = threading.Thread(target=heal_once_it_failed)
    healer.start()
    code, _, err = cli("instance", "upgrade", "acme", "--version", "9.9.9", "--timeout", "8",
                         capsys=capsys)
    healer.join(60)
    assert code == 1, err
    assert "upgrade failed" in err and "rolled back to the previous version (revision 1)" in err
    workload = the(two_pools, "apps/v1", "StatefulSet", "wsi-acme")
    assert workload["spec"]["template"]["spec"]["containers"][0]["image"] == image
    shown = run_ok(cli, capsys, "show", "acme", "--json")
    assert shown["version"] != "9.9.9" and shown["release"] == {"revision": 3, "status": "deployed"}

    upgraded = run_ok(cli, capsys, "upgrade", "acme", "--version", "9.9.9", "--json")
    assert upgraded["version"] == "9.9.9"
    assert the(two_pools, "apps/v1", "StatefulSet", "wsi-acme")["spec"]["template"]["spec"][
        "containers"][0]["image"].endswith(":9.9.9")


def test_delete_leaves_nothing_of_the_instance(two_pools: FakeKube, cli: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_ok(cli, capsys, "create", "acme", *TINY)
    run_ok(cli, capsys, "create", "globex", *TINY)
    globex_before = [(o["kind"], o["metadata"]["name"])
                     for kind in (("v1", "Secret"), ("apps/v1", "StatefulSet"))
                     for o in objects(two_pools, *kind, "wsi-globex")]
    done = run_ok(cli, capsys, "delete", "acme", "--yes", "--json")
    assert done["deleted"] is True
    assert "wsi-acme" not in {n["metadata"]["name"] for n in two_pools.objects("v1", "Namespace")}
    for api_version, kind in (("v1", "Secret"), ("apps/v1", "StatefulSet"), ("v1", "ResourceQuota"),
                              ("networking.k8s.io/v1", "NetworkPolicy"), ("v1", "Service")):
        assert objects(two_pools, api_version, kind, "wsi-acme") == []
    assert not [n for n in two_pools.objects("v1", "Node")
                if (n["metadata"].get("labels") or {}).get(DEDICATED) == "acme"]
    assert [i["name"] for i in run_ok(cli, capsys, "list", "--json")] == ["globex"]
    assert [(o["kind"], o["metadata"]["name"])
            for kind in (("v1", "Secret"), ("apps/v1", "StatefulSet"))
            for o in objects(two_pools, *kind, "wsi-globex")] == globex_before
    # the company's nodes can be given to a new instance of the same name
    run_ok(cli, capsys, "create", "acme", *TINY)


def test_dry_run_prints_every_object_and_needs_no_cluster(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, cli: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    import kubernetes_validate
    import yaml

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    code, out, err = cli("instance", "create", "acme", "--model", "weightship-tiny", "--on", "k8s",
                         "--host", "api.acme.example", "--dry-run", capsys=capsys)
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    for want in [("Namespace", "wsi-acme"), ("ResourceQuota", "weightship-quota"),
                 ("LimitRange", "weightship-defaults"),
                 ("NetworkPolicy", "weightship-default-deny"), ("Secret", "weightship-api-keys"),
                 ("Secret", "weightship-operator"), ("StatefulSet", "weightship"),
                 ("Ingress", "weightship"), ("Service", "weightship")]:
        assert want in kinds, want
    for d in docs:
        assert d["kind"] == "Namespace" or d["metadata"]["namespace"] == "wsi-acme"
        kubernetes_validate.validate(d, "1.33.0", strict=True)


def test_create_refuses_a_host_that_another_instance_serves(
        two_pools: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run_ok(cli, capsys, "create", "acme", *TINY, "--host", "api.acme.example")
    before = cluster_state(two_pools)
    err = refused(cli, capsys, "create", "globex", *TINY, "--host", "API.acme.example")
    assert "host API.acme.example is already the endpoint of instance 'acme' " \
           "(Ingress wsi-acme/weightship)" in err
    assert cluster_state(two_pools) == before
    run_ok(cli, capsys, "create", "globex", *TINY, "--host", "api.globex.example")


def test_what_may_reach_the_api_port_is_checked_before_anything_is_rendered(
        two_pools: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    before = cluster_state(two_pools)
    for flags, why in ((["--allow-from", ""], "--allow-from '' is not a namespace name"),
                       (["--allow-from", "Ingress_NGINX"], "is not a namespace name"),
                       (["--admin-from", "10.0.0.0/33"], "'10.0.0.0/33' is not a CIDR"),
                       (["--admin-from", "10.0.0.2"], "add its prefix length (10.0.0.2/32)")):
        assert why in refused(cli, capsys, "create", "acme", *TINY, *flags, code=2)
        assert why in refused(cli, capsys, "create", "acme", *TINY, *flags, "--dry-run", code=2)
    assert cluster_state(two_pools) == before
    # a record that lost every peer (edited by hand) is never rendered as "admit anyone"
    run_ok(cli, capsys, "create", "acme", *TINY)
    two_pools.store.patch(two_pools.store.kind("", "v1", "namespaces"), "", "wsi-acme",
                          "application/merge-patch+json", {"metadata": {"annotations": {
                              "weightship.io/allow-from": "", "weightship.io/admin-from": ""}}})
    policy = the(two_pools, "networking.k8s.io/v1", "NetworkPolicy", "wsi-acme", "weightship")
    assert "admit anyone" in refused(cli, capsys, "scale", "acme", "--replicas", "2", code=2)
    assert the(two_pools, "networking.k8s.io/v1", "NetworkPolicy", "wsi-acme",
               "weightship") == policy


def test_a_failed_first_install_leaves_nothing_and_can_be_run_again(
        two_pools: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    before = cluster_state(two_pools)
    two_pools.store.stalled_kinds.add("StatefulSet")  # the pods never turn ready
    code, out, err = cli("instance", "create", "acme", *TINY[:-3], "--timeout", "3",
                         capsys=capsys)
    assert code == 1 and out == "", err
    assert cluster_state(two_pools) == before  # no namespace, Secret or node label is left
    two_pools.store.stalled_kinds.discard("StatefulSet")
    assert run_ok(cli, capsys, "create", "acme", *TINY)["ready"] == 1


def test_delete_names_what_it_could_not_remove(two_pools: FakeKube, cli: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_ok(cli, capsys, "create", "acme", *TINY)
    # replica 0's claim is bound to a volume whose class retains it (weights, usage log)
    two_pools.seed({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-0"},
                    "spec": {"persistentVolumeReclaimPolicy": "Retain",
                             "capacity": {"storage": "2Gi"}}})
    two_pools.seed({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {
        "name": "models-weightship-0", "namespace": "wsi-acme"}, "spec": {"volumeName": "pv-0"}})
    code, out, err = cli("instance", "delete", "acme", "--yes", capsys=capsys)
    assert code == 1 and out == "", err
    assert "PersistentVolume pv-0 (Retain: it holds the weights and the usage log)" in err
    assert "wsi-acme" not in {n["metadata"]["name"] for n in two_pools.objects("v1", "Namespace")}

    # a namespace that a finalizer holds (a backup tool's, say) is still there after the wait
    run_ok(cli, capsys, "create", "globex", *TINY)
    two_pools.store.patch(two_pools.store.kind("", "v1", "namespaces"), "", "wsi-globex",
                          "application/merge-patch+json",
                          {"metadata": {"finalizers": ["backup.example.com/snapshot"]}})
    code, out, err = cli("instance", "delete", "globex", "--yes", "--timeout", "2",
                         capsys=capsys)
    assert code == 1 and out == "", err
    assert "namespace wsi-globex (Terminating, held by backup.example.com/snapshot)" in err
    assert not [n for n in two_pools.objects("v1", "Node")
                if (n["metadata"].get("labels") or {}).get(DEDICATED) == "globex"]
