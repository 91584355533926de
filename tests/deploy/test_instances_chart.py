"""The chart values an instance uses: the usage log on the model volume, and the helm test pod
with a hashed key file (no key in it to send)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from k8s_helpers import CHART

from weightship.deploy.k8s import helm as engine
from weightship.deploy.k8s.deployer import check_objects

Obj = dict[str, Any]


def _server(values: Obj) -> tuple[Obj, engine.Rendered]:
    rendered = engine.render(CHART, values, release="demo", namespace="ml")
    workload = next(o for o in rendered.objects if o["kind"] in ("Deployment", "StatefulSet"))
    return workload["spec"]["template"]["spec"], rendered


def test_usage_log_goes_to_the_model_volume_under_the_pods_name() -> None:
    values = {"usageLog": {"enabled": True}, "storage": {"mode": "perPodPVC"}}
    spec, rendered = _server(values)
    serve = spec["containers"][0]
    i = serve["args"].index("--usage-log")
    assert serve["args"][i + 1] == "/var/lib/weightship/usage/$(POD_NAME).jsonl"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in serve["env"]
    # the server may write the usage directory of the model volume and nothing else of it
    writable = [m for m in serve["volumeMounts"] if m["name"] == "models" and not m.get("readOnly")]
    assert writable == [{"name": "models", "mountPath": "/var/lib/weightship/usage",
                         "subPath": ".usage"}]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in serve["volumeMounts"]
    # the directory is made by an init container as the chart's uid (a missing subPath would be
    # made by the kubelet, as root)
    (usage_dir,) = [c for c in spec["initContainers"] if c["name"] == "usage-dir"]
    assert usage_dir["command"] == ["mkdir", "-p", "/models/.usage"]
    assert usage_dir["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert [c["name"] for c in spec["initContainers"]] == ["fetch", "usage-dir"]
    problems, _, _ = check_objects(rendered.objects + rendered.hooks,
                                   engine.effective_values(CHART, values))
    assert problems == []
    spec, _ = _server({})
    assert "--usage-log" not in spec["containers"][0]["args"]  # off by default
    assert [c["name"] for c in spec["initContainers"]] == ["fetch"]


def _instance(name: str) -> engine.Rendered:
    from weightship.instances import k8s_objects as objs

    values = objs.chart_overrides(name, replicas=1, gpus=1, host=None, tls_secret=None,
                                  version=None, storage_mode="perPodPVC",
                                  allow_from=["ingress-nginx", "monitoring"], admin_from=[])
    values["metrics"]["serviceMonitor"]["enabled"] = True
    return engine.render(CHART, values, release=name, namespace=f"wsi-{name}")


def test_prometheus_scrapes_an_instance_with_its_operator_key(tmp_path: Path) -> None:
    """The ServiceMonitor's bearer token is what the Secret it names holds: for an instance,
    the operator key, which /metrics accepts; the hashed key file would be sent as a "key"."""
    from weightship.instances.keys import OPERATOR_KEY
    from weightship.runtime.keys import KeyFile, load_key_file
    from weightship.runtime.runner import BackgroundServer
    from weightship.runtime.server import ServerState

    keys = KeyFile("acme")
    _, operator_key = keys.add(OPERATOR_KEY, scopes=("usage",))
    keys.add("ci")
    secrets = {("weightship-api-keys", "keys.json"): keys.to_text(),
               ("weightship-operator", "usage-key"): operator_key}
    (monitor,) = [o for o in _instance("acme").objects if o["kind"] == "ServiceMonitor"]
    credentials = monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
    token = secrets[(credentials["name"], credentials["key"])]
    (tmp_path / "keys.json").write_text(keys.to_text())
    state = ServerState("weightship-tiny", keyring=load_key_file(tmp_path / "keys.json"))
    with BackgroundServer(state) as srv:
        r = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {token}"},
                      timeout=30)
    assert r.status_code == 200 and "weightship_key_requests" in r.text


def test_the_helm_test_pod_of_an_instance_runs_on_the_companys_nodes_only() -> None:
    from instance_helpers import tainted_node
    from k8s_helpers import gpu_node
    from netpol import nodes_for

    nodes = [tainted_node("acme-1", "acme", label="acme"),
             tainted_node("globex-1", "globex", label="globex"), gpu_node("shared-1")]
    rendered = _instance("acme")
    (test_pod,) = rendered.hooks
    server = next(o for o in rendered.objects if o["kind"] == "StatefulSet")
    assert test_pod["spec"]["nodeSelector"] == server["spec"]["template"]["spec"]["nodeSelector"]
    assert nodes_for(test_pod["spec"], nodes) == {"acme-1"}


def test_helm_test_pod_passes_against_a_server_that_enforces_hashed_keys(tmp_path: Path) -> None:
    """The test pod's own script, run against a stand-in that answers 401 without a key (as a
    server with a hashed key file does): it exits 0; against one that answers 200, 1."""
    import http.server
    import threading

    rendered = engine.render(CHART, {}, release="demo", namespace="ml")
    (pod,) = rendered.hooks
    script = pod["spec"]["containers"][0]["args"][0]
    key_file = tmp_path / "api-key"
    key_file.write_text('{"format": "weightship-api-keys/1", "keys": []}\n')
    answers = [401]

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(answers[0])
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    seen: list[str | None] = []
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        local = (script.replace("http://demo-weightship:80", f"http://127.0.0.1:{stub.server_address[1]}")
                 .replace("/etc/weightship/api-key/api-key", str(key_file)))
        assert subprocess.run([sys.executable, "-c", local], timeout=60).returncode == 0
        answers[0] = 200
        assert subprocess.run([sys.executable, "-c", local], timeout=60).returncode == 1
        assert seen == [None, None]  # the key file's JSON is never sent as a key
    finally:
        stub.shutdown()
        stub.server_close()
