"""The chart values an instance uses: the usage log on the model volume, and the helm test pod
with a hashed key file (no key in it to send)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

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
    assert serve["args"][i + 1] == "/var/lib/weightship/volume/.usage/$(POD_NAME).jsonl"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in serve["env"]
    mounts = {m["mountPath"]: m for m in serve["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True  # the weights stay read-only where they are read
    assert mounts["/var/lib/weightship/volume"]["name"] == "models"
    assert not mounts["/var/lib/weightship/volume"].get("readOnly")
    problems, _, _ = check_objects(rendered.objects + rendered.hooks,
                                   engine.effective_values(CHART, values))
    assert problems == []
    spec, _ = _server({})
    assert "--usage-log" not in spec["containers"][0]["args"]  # off by default


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
