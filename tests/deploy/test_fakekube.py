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
