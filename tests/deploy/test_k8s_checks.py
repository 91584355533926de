"""The checks that guard a deployment: each must catch what it exists to catch (so a chart
change that breaks pod security, leaks a credential or writes an invalid object is stopped),
and the sizing and value precedence a user relies on."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from k8s_helpers import CHART

from weightship.catalog import load_card
from weightship.deploy.k8s import helm as engine
from weightship.deploy.k8s import policy
from weightship.deploy.k8s.deployer import check_objects, plan
from weightship.deploy.k8s.sizing import GIB, size_model
from weightship.deploy.k8s.values import merge
from weightship.errors import InvalidValuesError, RenderedObjectsRejectedError, UsageError

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def deployment() -> Obj:
    rendered = engine.render(CHART, {}, release="demo", namespace="ml")
    return next(o for o in rendered.objects if o["kind"] == "Deployment")


def mutated(obj: Obj, change: Any) -> Obj:
    out = copy.deepcopy(obj)
    change(out["spec"]["template"]["spec"])
    return out


def serve(spec: Obj) -> Obj:
    return next(c for c in spec["containers"] if c["name"] == "serve")


BREAKS = [
    ("hostPath volumes", lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
    ("host namespaces", lambda s: s.update(hostNetwork=True)),
    ("privileged containers", lambda s: serve(s)["securityContext"].update(privileged=True)),
    ("privilege escalation",
     lambda s: serve(s)["securityContext"].pop("allowPrivilegeEscalation")),
    ("capabilities", lambda s: serve(s)["securityContext"]["capabilities"].update(drop=[])),
    ("capabilities", lambda s: serve(s)["securityContext"]["capabilities"].update(
        add=["SYS_ADMIN"])),
    ("running as non-root", lambda s: (serve(s)["securityContext"].update(runAsNonRoot=False))),
    ("running as non-root user", lambda s: serve(s)["securityContext"].update(runAsUser=0)),
    ("seccomp", lambda s: serve(s)["securityContext"].update(
        seccompProfile={"type": "Unconfined"})),
    ("host ports", lambda s: serve(s)["ports"][0].update(hostPort=8000)),
    ("volume types", lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x",
                                                                          "path": "/"}})),
    ("sysctls", lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax",
                                                                "value": "1"}])),
]


def test_the_chart_pod_passes_restricted(deployment: Obj) -> None:
    assert policy.restricted_violations(deployment) == []


@pytest.mark.parametrize(("rule", "change"), BREAKS, ids=[f"{r}-{i}" for i, (r, _) in
                                                          enumerate(BREAKS)])
def test_each_restricted_rule_is_enforced(deployment: Obj, rule: str, change: Any) -> None:
    violations = policy.restricted_violations(mutated(deployment, change))
    assert rule in {v.rule for v in violations}


def test_plain_credentials_are_caught(deployment: Obj) -> None:
    leaked = mutated(deployment, lambda s: serve(s)["env"].append(
        {"name": "HF_TOKEN", "value": "hf_secret"}))
    flagged = mutated(deployment, lambda s: serve(s)["args"].append("--api-key=abc"))
    assert [v.detail for v in policy.plain_credentials(leaked)] == [
        "env HF_TOKEN has a plain value"]
    assert "passes a secret on the command line" in str(policy.plain_credentials(flagged)[0])
    assert policy.plain_credentials(deployment) == []  # --api-key-file names a file, not a key


def test_invalid_objects_fail_the_strict_schema(deployment: Obj) -> None:
    broken = copy.deepcopy(deployment)
    broken["spec"]["replica"] = 2  # a typo a non-strict check would let through
    problems, _ = policy.schema_problems([broken], ["1.29.0"])
    assert problems and "'replica' was unexpected" in problems[0]
    assert "Deployment/demo-weightship" in problems[0]


def test_check_objects_refuses_unacknowledged_host_paths(deployment: Obj) -> None:
    broken = mutated(deployment, lambda s: s["volumes"].append(
        {"name": "h", "hostPath": {"path": "/var"}}))
    effective = engine.effective_values(CHART, {})
    problems, _, accepted = check_objects([broken], effective)
    assert accepted == [] and any("hostPath volumes" in p for p in problems)


def test_plan_rejects_a_chart_that_renders_a_plain_credential() -> None:
    # extraEnv with valueFrom is allowed; a plain credential is stopped by validateValues, and
    # anything that slipped past it would be stopped by the policy check.
    with pytest.raises(InvalidValuesError):
        plan("mistral-7b-v0.1", release="demo", namespace="ml",
             sets=["serve.extraEnv[0].name=AWS_SECRET_ACCESS_KEY,"
                   "serve.extraEnv[0].value=plain"])
    with pytest.raises(RenderedObjectsRejectedError) as info:
        plan("mistral-7b-v0.1", release="demo", namespace="ml",
             sets=["serve.extraArgs[0]=--token=abc"])
    assert "plain credential" in str(info.value)


# ---- sizing --------------------------------------------------------------------------------


def test_mistral_7b_sizing_matches_its_published_facts() -> None:
    card = load_card("mistral-7b-v0.1")
    s = size_model(card.architecture, file_bytes=14_483_498_040, dtype="bfloat16",
                   max_batch=8, max_model_len=8192)
    assert card.architecture.n_params == 7_241_732_096
    assert s.weights_bytes == 14_483_464_192  # the safetensors minus their headers
    assert s.kv_cache_bytes == 8 * 8192 * 2 * 32 * 8 * 128 * 2  # 8 GiB
    assert 23 * GIB < s.gpu_memory_bytes < 25 * GIB
    assert s.storage_quantity() == "18Gi"  # values.yaml's default, derived


def test_plan_sizes_resources_from_the_card() -> None:
    p = plan("mistral-7b-v0.1", release="demo", namespace="ml", max_batch=2)
    assert p.values["gpu"]["minMemoryMiB"] == p.sizing.gpu_memory_mib  # type: ignore[union-attr]
    assert p.values["storage"]["size"] == "18Gi"
    assert p.values["serve"]["maxBatch"] == 2
    tiny = plan("weightship-tiny", release="demo", namespace="ml", gpus=0)
    assert tiny.values["storage"]["size"] == "2Gi"
    assert "minMemoryMiB" not in tiny.values["gpu"]
    deployment = next(o for o in tiny.rendered.objects if o["kind"] == "Deployment")
    assert "nvidia.com/gpu" not in str(deployment)


def test_user_values_win_over_derived_ones(tmp_path: Any) -> None:
    values_file = tmp_path / "v.yaml"
    values_file.write_text("storage:\n  size: 100Gi\nserve:\n  maxBatch: 1\n")
    p = plan("mistral-7b-v0.1", release="demo", namespace="ml", value_files=[values_file],
             sets=["serve.maxBatch=4"])
    assert p.values["storage"]["size"] == "100Gi"
    assert p.values["serve"]["maxBatch"] == 4  # --set beats -f, and sizing used it
    assert p.sizing is not None and p.sizing.max_batch == 4
    cpu = plan("mistral-7b-v0.1", release="demo", namespace="ml", sets=["gpu.count=0"])
    assert "minMemoryMiB" not in cpu.values["gpu"]  # sized for the CPU the user asked for


def test_bad_sizing_inputs_are_usage_errors() -> None:
    arch = load_card("weightship-tiny").architecture
    with pytest.raises(UsageError):
        size_model(arch, file_bytes=1, dtype="int3", max_batch=1, max_model_len=1)
    with pytest.raises(InvalidValuesError):
        plan("weightship-tiny", release="Not_A_Release", namespace="ml")


@given(st.recursive(st.none() | st.integers() | st.text(max_size=3),
                    lambda children: st.dictionaries(st.text(max_size=3), children, max_size=3),
                    max_leaves=8),
       st.dictionaries(st.text(max_size=3), st.integers(), max_size=3))
def test_merge_keeps_every_override(base: Any, override: dict[str, int]) -> None:
    base = base if isinstance(base, dict) else {}
    merged = merge(base, override)
    assert all(merged[k] == v for k, v in override.items())
    assert all(merged[k] == v for k, v in base.items() if k not in override)
