"""The fake API server behaves like Kubernetes where the deployer's tests rely on it: if it did
not, the live-path tests would prove nothing about a real cluster."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fakekube import FakeKube, running

CM = "/api/v1/namespaces/ml/configmaps"


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with running(ready_delay=0.2) as server:
        server.seed({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}})
        yield server


@pytest.fixture
def http(fake: FakeKube) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        yield client


def apply(http: httpx.Client, path: str, obj: dict, manager: str) -> httpx.Response:
    return http.patch(path, params={"fieldManager": manager}, content=json.dumps(obj),
                      headers={"Content-Type": "application/apply-patch+yaml"})


def test_server_side_apply_prunes_only_the_managers_own_fields(http: httpx.Client) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
          "data": {"a": "1", "b": "2"}}
    assert apply(http, f"{CM}/c", cm, "helm").status_code == 201
    assert http.patch(f"{CM}/c", json={"data": {"other": "x"}},
                      headers={"Content-Type": "application/merge-patch+json"}).is_success
    cm["data"] = {"a": "10"}
    assert apply(http, f"{CM}/c", cm, "helm").status_code == 200
    assert http.get(f"{CM}/c").json()["data"] == {"a": "10", "other": "x"}


def test_a_crd_adds_a_kind_that_is_discovered_stored_and_collected(http: httpx.Client) -> None:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.com"},
           "spec": {"group": "example.com", "scope": "Namespaced",
                    "names": {"kind": "Widget", "plural": "widgets"},
                    "versions": [{"name": "v1", "served": True, "storage": True}]}}
    assert http.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                     json=crd).status_code == 201
    assert "example.com" in [g["name"] for g in http.get("/apis").json()["groups"]]
    widgets = "/apis/example.com/v1/namespaces/ml/widgets"
    for name, color in (("w1", "red"), ("w2", "blue")):
        body = {"apiVersion": "example.com/v1", "kind": "Widget",
                "metadata": {"name": name, "labels": {"color": color}}}
        assert http.post(widgets, json=body).status_code == 201
    assert http.post(widgets, json=body).status_code == 409
    listed = http.get(widgets, params={"labelSelector": "color in (red,green)"}).json()
    assert [w["metadata"]["name"] for w in listed["items"]] == ["w1"]
    assert http.delete("/api/v1/namespaces/ml").is_success
    assert http.get(f"{widgets}/w2").status_code == 404


def test_generation_and_resource_versions_follow_kubernetes(http: httpx.Client) -> None:
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
              "spec": {"replicas": 1}}
    created = http.post("/apis/apps/v1/namespaces/ml/deployments", json=deploy).json()
    assert created["metadata"]["generation"] == 1
    stale = {**created, "spec": {"replicas": 2}}
    assert http.put("/apis/apps/v1/namespaces/ml/deployments/d", json=stale).is_success
    assert http.put("/apis/apps/v1/namespaces/ml/deployments/d",
                    json=stale).status_code == 409  # resourceVersion moved on
    current = http.get("/apis/apps/v1/namespaces/ml/deployments/d").json()
    assert current["metadata"]["generation"] == 2
    labelled = {**current, "metadata": {**current["metadata"], "labels": {"x": "y"}}}
    updated = http.put("/apis/apps/v1/namespaces/ml/deployments/d", json=labelled).json()
    assert updated["metadata"]["generation"] == 2  # metadata is not spec


def test_watch_streams_the_rollout_becoming_ready(http: httpx.Client) -> None:
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
              "spec": {"replicas": 3}}
    http.post("/apis/apps/v1/namespaces/ml/deployments", json=deploy)
    events = []
    with http.stream("GET", "/apis/apps/v1/namespaces/ml/deployments",
                     params={"watch": "true", "timeoutSeconds": "3"}) as stream:
        for line in stream.iter_lines():
            event = json.loads(line)
            events.append(event)
            if event["object"].get("status", {}).get("readyReplicas") == 3:
                break
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED"]
    assert events[-1]["object"]["status"]["observedGeneration"] == 1


def test_pod_proxy_reaches_the_pod_and_drops_the_api_servers_credentials(
        fake: FakeKube, http: httpx.Client) -> None:
    """``pods/NAME:PORT/proxy/PATH`` is forwarded to the pod's IP, with the query and the other
    headers, but not the ``Authorization`` the API server consumed; the kubelet's status (the
    pod's IP) survives the fake controller's own status updates."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, str | None, str | None]] = []

    class Pod(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization"),
                          self.headers.get("X-Weightship-Key")))
            body = b'{"ok": true}\n'
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    pod_server = ThreadingHTTPServer(("127.0.0.1", 0), Pod)
    threading.Thread(target=pod_server.serve_forever, daemon=True).start()
    port = pod_server.server_address[1]
    try:
        fake.seed({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ml"},
                   "spec": {"containers": [{"name": "c", "image": "x"}]},
                   "status": {"podIP": "127.0.0.1"}})
        from tests.net import wait_until

        wait_until(lambda: fake.objects("v1", "Pod", "ml")[0]["status"].get("phase") == "Running",
                   10, "the pod to run")
        r = http.get(f"/api/v1/namespaces/ml/pods/p:{port}/proxy/v1/usage", params={"a": "1"},
                     headers={"Authorization": "Bearer cluster-token", "X-Weightship-Key": "k"})
        assert r.status_code == 200 and r.json() == {"ok": True}
        assert r.headers["content-type"] == "application/x-ndjson"
        assert seen == [("/v1/usage?a=1", None, "k")]
        assert http.get("/api/v1/namespaces/ml/pods/p/proxy/").status_code == 503  # no port known
    finally:
        pod_server.shutdown()
        pod_server.server_close()


def test_finalizers_hold_any_object_and_a_terminating_namespace(http: httpx.Client) -> None:
    merge = {"Content-Type": "application/merge-patch+json"}
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "held", "finalizers": ["example.com/backup"]}}
    assert http.post(CM, json=cm).status_code == 201
    assert http.delete(f"{CM}/held").status_code == 200
    held = http.get(f"{CM}/held").json()
    assert held["metadata"]["deletionTimestamp"]  # marked, still there
    assert http.patch(f"{CM}/held", json={"metadata": {"finalizers": None}},
                      headers=merge).is_success
    assert http.get(f"{CM}/held").status_code == 404  # gone with its last finalizer

    assert http.post(CM, json={**cm, "metadata": {"name": "inside"}}).status_code == 201
    assert http.patch("/api/v1/namespaces/ml", json={"metadata": {"finalizers": ["x/y"]}},
                      headers=merge).is_success
    assert http.delete("/api/v1/namespaces/ml").status_code == 200
    ns = http.get("/api/v1/namespaces/ml").json()
    assert ns["status"]["phase"] == "Terminating"
    assert http.get(f"{CM}/inside").status_code == 404  # its content is deleted meanwhile
    assert http.post(CM, json={**cm, "metadata": {"name": "late"}}).status_code == 403
    assert http.patch("/api/v1/namespaces/ml", json={"metadata": {"finalizers": []}},
                      headers=merge).is_success
    assert http.get("/api/v1/namespaces/ml").status_code == 404
