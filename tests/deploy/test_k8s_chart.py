"""The Helm chart, rendered by Helm's own engine over a matrix of value combinations: each must
lint clean, validate strictly against the official schemas of every supported Kubernetes
version, pass the "restricted" Pod Security Standard, and carry no credential as a plain value.
Values that contradict each other must fail with a message that says what to change."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from k8s_helpers import CHART

from weightship.deploy.k8s import helm as engine
from weightship.deploy.k8s.deployer import check_objects
from weightship.errors import InvalidValuesError

Obj = dict[str, Any]


def render(values: Obj, release: str = "demo") -> engine.Rendered:
    return engine.render(CHART, values, release=release, namespace="ml")


def kinds(r: engine.Rendered) -> dict[str, list[Obj]]:
    out: dict[str, list[Obj]] = {}
    for o in r.objects:
        out.setdefault(o["kind"], []).append(o)
    return out


def workload(r: engine.Rendered) -> Obj:
    found = [o for o in r.objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, [o["kind"] for o in r.objects]
    return found[0]


def container(pod_owner: Obj, name: str) -> Obj:
    spec = pod_owner["spec"]["template"]["spec"]
    every = spec.get("initContainers", []) + spec["containers"]
    return next(c for c in every if c["name"] == name)


def env_of(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def volumes(pod_owner: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in pod_owner["spec"]["template"]["spec"].get("volumes", [])}


# ---- what each combination must show a user ------------------------------------------------


def _defaults(r: engine.Rendered) -> None:
    w = workload(r)
    assert w["kind"] == "Deployment"
    serve = container(w, "serve")
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert serve["args"][:2] == ["serve", "/models/mistral-7b-v0.1"]
    assert "--api-key-file" in serve["args"]
    assert serve["args"][serve["args"].index("--name") + 1] == "mistral-7b-v0.1"
    assert {p["httpGet"]["path"] for p in (serve["startupProbe"], serve["livenessProbe"])} == {
        "/health"}
    assert serve["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = serve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # a cold 14.5 GB load
    assert volumes(w)["models"]["emptyDir"]["sizeLimit"] == "18Gi"
    assert kinds(r)["Secret"][0]["metadata"]["name"] == "demo-weightship-api-key"
    assert w["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def _cpu(r: engine.Rendered) -> None:
    serve = container(workload(r), "serve")
    assert "nvidia.com/gpu" not in json.dumps(serve["resources"])
    assert serve["args"][serve["args"].index("--device") + 1] == "cpu"
    assert "tolerations" not in workload(r)["spec"]["template"]["spec"]


def _shared(r: engine.Rendered) -> None:
    claim = kinds(r)["PersistentVolumeClaim"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert volumes(workload(r))["models"]["persistentVolumeClaim"]["claimName"] == \
        claim["metadata"]["name"]
    fetch = container(workload(r), "fetch")["args"]
    assert fetch[fetch.index("--wait-lock") + 1] == "3600"  # replicas share one directory


def _existing_claim(r: engine.Rendered) -> None:
    assert "PersistentVolumeClaim" not in kinds(r)
    assert volumes(workload(r))["models"]["persistentVolumeClaim"]["claimName"] == "models-rwx"


def _per_pod(r: engine.Rendered) -> None:
    sts = workload(r)
    assert sts["kind"] == "StatefulSet"
    assert "replicas" not in sts["spec"]  # the HPA owns the replica count
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert sts["spec"]["serviceName"] == "demo-weightship-headless"
    hpa = kinds(r)["HorizontalPodAutoscaler"][0]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"


def _node_cache_p2p(r: engine.Rendered) -> None:
    ds = kinds(r)["DaemonSet"][0]
    assert volumes(ds)["models"]["hostPath"]["path"] == "/var/lib/weightship/models"
    assert volumes(workload(r))["models"]["hostPath"]["path"] == "/var/lib/weightship/models"
    seed = container(ds, "seed")
    assert seed["args"][:4] == ["seed", "/models/mistral-7b-v0.1", "--listen", "0.0.0.0:6881"]
    fetch = container(workload(r), "fetch")
    assert fetch["args"][fetch["args"].index("--peers-from-dns") + 1] == \
        "demo-weightship-peers.ml.svc:6881"
    assert seed["args"][-2:] == ["--peers-from-dns", "demo-weightship-peers.ml.svc:6881"]
    peers = next(s for s in kinds(r)["Service"] if s["metadata"]["name"].endswith("-peers"))
    assert peers["spec"]["clusterIP"] == "None"
    assert container(workload(r), "prepare-node-cache")["command"][0] == "chown"


def _node_cache_plain(r: engine.Rendered) -> None:
    assert "DaemonSet" not in kinds(r)
    names = [c["name"] for c in workload(r)["spec"]["template"]["spec"]["initContainers"]]
    assert names == ["fetch"]  # prepare=false: no root container at all


def _p2p_empty_dir(r: engine.Rendered) -> None:
    ds = kinds(r)["DaemonSet"][0]
    assert volumes(ds)["models"]["emptyDir"]["sizeLimit"] == "18Gi"
    assert "--peers-from-dns" in container(ds, "fetch")["args"]


def _ingress(r: engine.Rendered) -> None:
    ing = kinds(r)["Ingress"][0]
    assert ing["spec"]["tls"][0]["secretName"] == "api-tls"
    assert ing["spec"]["rules"][0]["host"] == "llm.example.com"
    assert "Secret" not in kinds(r)  # the existing API-key Secret is used, none generated
    assert volumes(workload(r))["api-key"]["secret"]["secretName"] == "team-api-key"
    assert "https://llm.example.com/v1/models" in r.notes


def _hpa_metrics(r: engine.Rendered) -> None:
    hpa = kinds(r)["HorizontalPodAutoscaler"][0]
    assert hpa["spec"]["metrics"][0]["type"] == "Pods"
    pdb = kinds(r)["PodDisruptionBudget"][0]
    assert pdb["spec"] == {**pdb["spec"], "minAvailable": 1} and "maxUnavailable" not in pdb["spec"]


def _credentials(r: engine.Rendered) -> None:
    fetch = container(workload(r), "fetch")
    env = env_of(fetch)
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.internal.example"
    args = fetch["args"]
    assert args[args.index("--source") + 1] == "hf,s3"
    assert args[args.index("--revision") + 1] == "7231864"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--include"] == ["*.safetensors",
                                                                             "*.json"]
    assert workload(r)["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def _locked_down(r: engine.Rendered) -> None:
    assert "--api-key-file" not in container(workload(r), "serve")["args"]
    policy = kinds(r)["NetworkPolicy"][0]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    sources = [peer["ipBlock"]["cidr"] for rule in policy["spec"]["egress"]
               for peer in rule.get("to") or [] if "ipBlock" in peer]
    assert sources == ["203.0.113.0/24"]  # no public internet once the sources are listed
    endpoint = kinds(r)["ServiceMonitor"][0]["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics" and "authorization" not in endpoint  # no key to send


def _everything(r: engine.Rendered) -> None:
    spec = workload(r)["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    keys = [e["key"] for e in terms[0]["matchExpressions"]]
    assert keys == ["node.kubernetes.io/instance-type", "nvidia.com/gpu.memory"]
    assert "topologySpreadConstraints" not in spec
    endpoint = kinds(r)["ServiceMonitor"][0]["spec"]["endpoints"][0]
    assert endpoint["authorization"]["credentials"] == {"name": "demo-weightship-api-key",
                                                        "key": "api-key"}  # /metrics needs it
    assert {"DaemonSet", "Ingress", "HorizontalPodAutoscaler", "NetworkPolicy",
            "ServiceMonitor", "StatefulSet"} <= set(kinds(r))


def _load_balancer(r: engine.Rendered) -> None:
    svc = kinds(r)["Service"][0]
    assert svc["spec"]["type"] == "LoadBalancer" and svc["metadata"]["name"] == "llm"
    assert svc["metadata"]["labels"]["team"] == "research"
    env = env_of(container(workload(r), "serve"))
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "upstream"
    assert "loadBalancer.ingress" in r.notes


NODE_CACHE = {"mode": "nodeCache", "nodeCache": {"hostPathAcknowledged": True}}
MATRIX: list[tuple[str, Obj, Callable[[engine.Rendered], None]]] = [
    ("defaults", {}, _defaults),
    ("cpu-only", {"gpu": {"count": 0}, "serve": {"dtype": "float32", "resources": {
        "requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}},
        "model": {"name": "weightship-tiny"}}, _cpu),
    ("shared-pvc", {"storage": {"mode": "sharedPVC", "storageClassName": "nfs"},
                    "replicaCount": 3}, _shared),
    ("shared-existing-claim", {"storage": {"mode": "sharedPVC", "existingClaim": "models-rwx"}},
     _existing_claim),
    ("per-pod-pvc-hpa", {"storage": {"mode": "perPodPVC"}, "autoscaling": {"enabled": True}},
     _per_pod),
    ("node-cache-p2p", {"storage": NODE_CACHE, "p2p": {"enabled": True}}, _node_cache_p2p),
    ("node-cache-no-p2p", {"storage": {**NODE_CACHE, "nodeCache": {
        "hostPathAcknowledged": True, "prepare": False}}}, _node_cache_plain),
    ("p2p-empty-dir", {"p2p": {"enabled": True}}, _p2p_empty_dir),
    ("ingress-tls-existing-key", {
        "ingress": {"enabled": True, "className": "nginx", "hosts": ["llm.example.com"],
                    "tls": [{"secretName": "api-tls", "hosts": ["llm.example.com"]}]},
        "apiKey": {"existingSecret": "team-api-key", "secretKey": "key"}}, _ingress),
    ("hpa-custom-metrics-pdb", {
        "autoscaling": {"enabled": True, "minReplicas": 2, "metrics": [{"type": "Pods", "pods": {
            "metric": {"name": "weightship_queue_depth"},
            "target": {"type": "AverageValue", "averageValue": "4"}}}]},
        "podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": None}}, _hpa_metrics),
    ("existing-credentials", {
        "model": {"source": "hf,s3", "revision": "7231864", "include": ["*.safetensors",
                                                                         "*.json"]},
        "fetch": {"hfToken": {"existingSecret": "hf", "key": "token"},
                  "aws": {"existingSecret": "s3-creds",
                          "endpointUrl": "https://s3.internal.example"}},
        "imagePullSecrets": ["regcred"]}, _credentials),
    ("no-api-key-netpol-monitor", {
        "apiKey": {"enabled": False},
        "networkPolicy": {"allowedFrom": [
            {"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
            "egress": {"publicSources": False, "sourceCIDRs": ["203.0.113.0/24"]}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
     _locked_down),
    ("everything", {
        "storage": {"mode": "perPodPVC", "storageClassName": "fast"}, "p2p": {"enabled": True},
        "ingress": {"enabled": True, "hosts": ["a.example.com"]},
        "autoscaling": {"enabled": True}, "networkPolicy": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "gpu": {"count": 2, "minMemoryMiB": 40000, "runtimeClassName": "nvidia"},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{
                "key": "node.kubernetes.io/instance-type", "operator": "In",
                "values": ["p5.48xlarge"]}]}]}}},
        "topologySpread": {"enabled": False}, "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                         "effect": "NoSchedule"}]}, _everything),
    ("load-balancer-overrides", {
        "service": {"type": "LoadBalancer"}, "fullnameOverride": "llm",
        "commonLabels": {"team": "research"}, "podAnnotations": {"example.com/owner": "ml"},
        "serve": {"extraEnv": [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "upstream", "key": "key"}}}], "extraArgs": ["--log-requests"]},
        "image": {"digest": "sha256:" + "a" * 64}}, _load_balancer),
]


@pytest.mark.parametrize(("name", "values", "expect"), MATRIX, ids=[m[0] for m in MATRIX])
def test_matrix_renders_valid_secure_objects(name: str, values: Obj,
                                             expect: Callable[[engine.Rendered], None]) -> None:
    for version in (engine.SUPPORTED_KUBERNETES[0], engine.SUPPORTED_KUBERNETES[-1]):
        assert engine.lint(CHART, values, kube_version=version) == []
    rendered = render(values)
    effective = engine.effective_values(CHART, values)
    problems, unchecked, accepted = check_objects(rendered.objects + rendered.hooks, effective)
    assert problems == []
    assert unchecked == (["monitoring.coreos.com/v1 ServiceMonitor"]
                         if "ServiceMonitor" in kinds(rendered) else [])
    if effective["storage"]["mode"] == "nodeCache":
        assert accepted and all("hostPath" in a or "prepare-node-cache" in a for a in accepted)
    else:
        assert accepted == []
    expect(rendered)


def test_helm_test_pod_lists_models_with_the_api_key() -> None:
    rendered = render({})
    (pod,) = rendered.hooks
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "http://demo-weightship:80/v1/models" in script and "Bearer" in script
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "demo-weightship-api-key"


def test_notes_say_how_to_reach_the_endpoint_and_send_a_request() -> None:
    notes = render({}).notes
    assert "kubectl -n ml port-forward svc/demo-weightship 8000:80" in notes
    assert "curl -s http://127.0.0.1:8000/v1/completions" in notes
    assert "get secret demo-weightship-api-key" in notes


# ---- invalid values ------------------------------------------------------------------------

INVALID = [
    ({"storage": {"mode": "nodeCache"}}, "pod-security.kubernetes.io/enforce=privileged"),
    ({"storage": {"existingClaim": "x"}}, "only used with storage.mode=sharedPVC"),
    ({"fetch": {"enabled": False}}, "every pod would start with an empty model directory"),
    ({"p2p": {"enabled": True}, "fetch": {"enabled": False}, "storage": {"mode": "sharedPVC"}},
     "p2p.enabled=true needs fetch.enabled=true"),
    ({"apiKey": {"enabled": False, "existingSecret": "k"}}, "apiKey.enabled=false"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "autoscaling.minReplicas (5) is greater than autoscaling.maxReplicas (2)"),
    ({"podDisruptionBudget": {"minAvailable": 1}}, "set either minAvailable or maxUnavailable"),
    ({"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": None}},
     "minAvailable=1 with replicaCount=1 would block every node drain"),
    ({"ingress": {"enabled": True}}, "needs at least one host"),
    ({"serve": {"extraEnv": [{"name": "HF_TOKEN", "value": "hf_abc"}]}},
     "serve.extraEnv HF_TOKEN carries a plain value"),
    ({"gpu": {"count": 0, "minMemoryMiB": 1000}}, "gpu.count=0"),
    ({"p2p": {"enabled": True, "affinity": {"nodeAffinity": {}}}},
     "p2p.nodeSelector and p2p.affinity apply only with p2p.followWorkload=false"),
    ({"networkPolicy": {"egress": {"publicSources": False}}},
     "leaves the fetch no source to reach"),
    ({"networkPolicy": {"restrictEgress": True}},
     "additional properties 'restrictEgress' not allowed"),
    ({"networkPolicy": {"egress": {"sourceCIDRs": ["huggingface.co"]}}},
     "at '/networkPolicy/egress/sourceCIDRs/0'"),
    ({"storage": {"mode": "nfs"}}, "at '/storage/mode': value must be one of"),
    ({"fetch": {"hfToken": "hf_plain_token"}}, "at '/fetch/hfToken'"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"model": {"dir": "../etc"}}, "at '/model/dir'"),
    ({"storage": {"size": "lots"}}, "at '/storage/size'"),
]


@pytest.mark.parametrize(("values", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_values_fail_with_a_clear_message(values: Obj, message: str) -> None:
    with pytest.raises(InvalidValuesError) as info:
        render(values)
    assert any(message in p for p in info.value.problems), info.value.problems
    assert info.value.exit_code == 2


def test_all_contradictions_are_reported_together() -> None:
    with pytest.raises(InvalidValuesError) as info:
        render({"storage": {"mode": "nodeCache"}, "ingress": {"enabled": True}})
    assert len(info.value.problems) == 2


def test_a_rule_that_finds_several_problems_reports_each() -> None:
    """The extraEnv rule (one named validateValues helper) finds one problem per variable."""
    with pytest.raises(InvalidValuesError) as info:
        render({"serve": {"extraEnv": [{"name": "HF_TOKEN", "value": "a"}, {"name": "DEBUG", "value": "1"},
                                       {"name": "AWS_SECRET_ACCESS_KEY", "value": "b"}]},
                "ingress": {"enabled": True}})
    problems = info.value.problems
    assert [p.split()[1] for p in problems if p.startswith("serve.extraEnv")] == ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY"]
    assert len(problems) == 3, problems


# ---- schema and values in step; chart hygiene ------------------------------------------------


def _value_paths(values: Obj, schema: Obj, prefix: str = "") -> tuple[set[str], set[str]]:
    """(paths in values.yaml, paths in the schema) down to where either stops describing keys."""
    in_values, in_schema = set(), set()
    props = schema.get("properties")
    for key, value in values.items():
        in_values.add(prefix + key)
        sub = (props or {}).get(key)
        if isinstance(value, dict) and value and sub and "properties" in sub:
            v, s = _value_paths(value, sub, f"{prefix}{key}.")
            in_values |= v
            in_schema |= s
    for key, sub in (props or {}).items():
        in_schema.add(prefix + key)
        if key not in values and "properties" in sub:
            in_schema |= {f"{prefix}{key}.{k}" for k in sub["properties"]}
    return in_values, in_schema


def test_values_schema_and_values_yaml_have_the_same_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_values, in_schema = _value_paths(values, schema)
    assert sorted(in_values - in_schema) == [], "in values.yaml, missing from the schema"
    assert sorted(in_schema - in_values) == [], "in the schema, missing from values.yaml"
    assert len(in_values) > 100


def test_schema_forbids_unknown_keys_at_every_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: Obj, path: str) -> list[str]:
        out = []
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                out.append(path or "/")
            for k, v in node["properties"].items():
                out += walk(v, f"{path}.{k}")
        return out

    assert walk(schema, "") == []


def _key_lines(lines: list[str]) -> list[tuple[str, bool]]:
    """(dotted path, has a comment right above) of every mapping key in values.yaml."""
    out, stack = [], []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z]\w*):", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack = [*stack[:depth], m.group(2)]
        out.append((".".join(stack), i > 0 and lines[i - 1].strip().startswith("#")))
    return out


def test_every_value_is_documented() -> None:
    """Each key the schema describes has a comment above it, or belongs to a small group (the
    probes) whose parent's comment documents it as a whole."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = dict(_key_lines((CHART / "values.yaml").read_text().splitlines()))

    def in_schema(path: str) -> bool:
        node = schema
        for part in path.split("."):
            node = (node.get("properties") or {}).get(part)
            if node is None:
                return False
        return True

    def children(path: str) -> list[str]:
        return [k for k in keys if k.rpartition(".")[0] == path and in_schema(k)]

    def documented(path: str) -> bool:
        if keys[path]:
            return True
        parent = path.rpartition(".")[0]
        if children(path):  # a section: documented through its keys
            return all(keys[k] or (children(k) and documented(k)) for k in children(path))
        return bool(parent) and keys[parent] and not any(keys[k] for k in children(parent))

    described = [k for k in keys if in_schema(k)]
    assert len(described) > 100
    assert [k for k in described if not documented(k)] == []


def test_chart_layout_follows_house_style() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["kubeVersion"].startswith(">=1.29")
    templates = CHART / "templates"
    for path in templates.rglob("*"):
        if path.is_file():
            assert len(path.read_text().splitlines()) < 300, path
    defined = re.findall(r'define "([^"]+)"', "".join(
        p.read_text() for p in templates.glob("_*.tpl")))
    assert defined and all(d.startswith("weightship.") for d in defined)
    # One template per object kind: no kind comes from two template files.
    sources: dict[str, set[str]] = {}
    rendered = render({"storage": {"mode": "perPodPVC"}, "p2p": {"enabled": True},
                       "ingress": {"enabled": True, "hosts": ["h"]},
                       "autoscaling": {"enabled": True}, "networkPolicy": {"enabled": True},
                       "metrics": {"serviceMonitor": {"enabled": True}}})
    for path, text in rendered.manifests.items():
        for doc in yaml.safe_load_all(text) if path.endswith(".yaml") else []:
            if doc:
                sources.setdefault(doc["kind"], set()).add(path)
    assert {k: v for k, v in sources.items() if len(v) > 1} == {}
    assert (CHART / "templates" / "NOTES.txt").is_file()
