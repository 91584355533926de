"""What an instance is made of, without a cluster: its name rules, the quota summed from a
rendered release, and the targets it can run on."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightship.errors import InvalidInstanceNameError, UsageError
from weightship.instances import TARGETS, TargetOptions, check_name, target
from weightship.instances import k8s_objects as objs
from weightship.instances.k8s_record import dedicated_nodes

LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@given(st.text(alphabet="abcxyz019-_.A ", max_size=45))
def test_a_name_is_accepted_exactly_when_it_is_a_short_dns_label(name: str) -> None:
    ok = bool(LABEL.match(name)) and len(name) <= 40
    try:
        check_name(name)
    except InvalidInstanceNameError as e:
        assert not ok and e.exit_code == 2
    else:
        assert ok


@pytest.mark.parametrize("text,value", [("24Gi", 24 << 30), ("500m", Fraction(1, 2)), ("4", 4),
                                        (2, 2), ("1.5Gi", 3 << 29), ("10k", 10_000)])
def test_quantities(text: Any, value: Any) -> None:
    assert objs.quantity(text) == value


def _workload(replicas: int, *, init_memory: str = "1Gi", gpus: int = 1) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "weightship"},
            "spec": {"replicas": replicas, "template": {"spec": {
                "initContainers": [{"name": "fetch", "resources": {
                    "requests": {"cpu": "1", "memory": init_memory}}}],
                "containers": [{"name": "serve", "resources": {
                    "requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": gpus},
                    "limits": {"memory": "32Gi", "nvidia.com/gpu": gpus}}},
                               {"name": "sidecar"}]}},
                "volumeClaimTemplates": [{"spec": {"resources": {"requests": {"storage": "18Gi"}}}}]}}


def test_the_quota_holds_every_pod_of_the_release_at_once() -> None:
    test_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": {
        "containers": [{"name": "t", "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                                                   "limits": {"memory": "128Mi"}}}]}}
    hard = objs.quota("acme", [_workload(2), test_pod])["spec"]["hard"]
    # per pod: serve + the sidecar's LimitRange defaults (100m, 128Mi; limit 256Mi)
    assert hard["requests.cpu"] == "8210m" and hard["requests.memory"] == "49440Mi"
    assert hard["limits.memory"] == "66176Mi" and hard["requests.nvidia.com/gpu"] == "2"
    assert hard["pods"] == "3" and hard["persistentvolumeclaims"] == "2"
    assert hard["requests.storage"] == "36Gi"
    assert hard["services.loadbalancers"] == "0" and hard["services.nodeports"] == "0"
    # an init container larger than the containers sets the pod's need (the scheduler's rule)
    big_init = objs.quota("acme", [_workload(1, init_memory="64Gi")])["spec"]["hard"]
    assert big_init["requests.memory"] == "64Gi"


def test_a_paused_instance_holds_no_gpu_but_keeps_its_claims() -> None:
    running = objs.quota("acme", [_workload(3)])
    paused = objs.quota("acme", [_workload(0)], floor=running["spec"]["hard"])["spec"]["hard"]
    assert paused["requests.nvidia.com/gpu"] == "0" and paused["pods"] == "0"
    assert paused["persistentvolumeclaims"] == "3" and paused["requests.storage"] == "54Gi"
    widest = objs.widest(objs.quota("acme", [_workload(1)]), running)["spec"]["hard"]
    assert widest["requests.nvidia.com/gpu"] == "3"


def _node(name: str, taint: str | None, label: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {objs.DEDICATED: label} if label else {}},
            "spec": {"taints": [{"key": objs.DEDICATED, "value": taint, "effect": "NoSchedule"}]
                     if taint else []}}


def test_dedicated_nodes_are_the_tainted_ones_and_never_another_instances() -> None:
    assert dedicated_nodes([_node("a1", "acme"), _node("g1", "globex", "globex")], "acme") == (
        ["a1"], [])
    _, problems = dedicated_nodes([_node("a1", "acme", "globex")], "acme")
    assert problems == ["node a1 is tainted for acme but labelled for instance 'globex'"]
    _, problems = dedicated_nodes([_node("x", None, "acme")], "acme")
    assert "no node is tainted weightship.io/dedicated=acme:NoSchedule" in problems[0]
    assert "labelled for acme but not tainted" in problems[1]


def test_an_unknown_target_is_a_usage_error_naming_the_known_ones() -> None:
    assert "k8s" in TARGETS
    with pytest.raises(UsageError, match="cannot run on 'mars'") as e:
        target("mars", TargetOptions())
    assert e.value.hint is not None and "k8s" in e.value.hint


@pytest.mark.parametrize("field,value,why", [
    ("gpus", "two", "is not a whole number"), ("replicas", "0", "is not a whole number of at least 1"),
    ("values", "{not json", "is not JSON"), ("values", "[1, 2]", "is not a JSON object"),
    ("model", "", "is missing")])
def test_a_record_edited_by_hand_is_a_typed_error_naming_the_annotation(
        field: str, value: str, why: str) -> None:
    from weightship.errors import InstanceRecordError
    from weightship.instances.k8s_record import Record

    good = Record(model="weightship-tiny", gpus=1, replicas=2).annotations()
    ns = {"metadata": {"name": "wsi-acme",
                       "annotations": {**good, f"weightship.io/{field}": value}}}
    with pytest.raises(InstanceRecordError) as e:
        Record.of(ns)
    assert f"annotation weightship.io/{field} {why}" in str(e.value) and e.value.exit_code == 1
    assert "kubectl annotate" in (e.value.hint or "")
    assert Record.of({"metadata": {"name": "wsi-acme", "annotations": good}}).replicas == 2
