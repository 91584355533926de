"""What the chart hands `weightship fetch`: the Hub revision (model.revision) and the key that
signed the manifests of s3:// and https:// sources (fetch.trustKey), rendered by Helm's own
engine and checked like every other combination (lint, the official schemas, the restricted
Pod Security Standard)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_helpers import CHART

from tests.conftest import Result, assert_clean_failure, assert_same_files, run_cli
from tests.fetch.webserver import serve
from weightship.catalog import load_card
from weightship.deploy.k8s import helm as engine
from weightship.deploy.k8s.deployer import check_objects
from weightship.errors import InvalidValuesError
from weightship.manifest import Manifest
from weightship.signing import generate_key, sign_directory

Obj = dict[str, Any]


def render(values: Obj) -> engine.Rendered:
    return engine.render(CHART, values, release="demo", namespace="ml")


def fetch_args(r: engine.Rendered) -> list[str]:
    (w,) = [o for o in r.objects if o["kind"] in ("Deployment", "StatefulSet")]
    (fetch,) = [c for c in w["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch"]
    return list(fetch["args"])


# ---- model.revision ------------------------------------------------------------------------


def test_the_revision_value_says_what_the_fetch_does() -> None:
    """An empty model.revision passes no --revision, so the default model's card pin decides,
    and the commit the comment names is that pin; a set value is passed as it is."""
    text = (CHART / "values.yaml").read_text()
    comment = text[:text.index('\n  revision: ""')].rsplit("# --", 1)[1]
    default_model = yaml.safe_load(text)["model"]["name"]
    card = load_card(default_model)
    (hf,) = [s for s in card.sources if s["kind"] == "hf"]
    assert re.findall(r"\b[0-9a-f]{40}\b", comment) == [card.hub_revision(hf)]
    assert "--revision" not in fetch_args(render({}))
    args = fetch_args(render({"model": {"revision": "main"}}))
    assert args[args.index("--revision") + 1] == "main"
    # An hf:// URI keeps its own @revision: the chart passes the URI whole, nothing beside it.
    args = fetch_args(render({"model": {"name": "hf://acme/m7b@v1.0"}}))
    assert args[1] == "hf://acme/m7b@v1.0" and "--revision" not in args


# ---- fetch.trustKey ------------------------------------------------------------------------

KEY_FROM = {"configMap": {"configMap": "models-key", "key": "acme.pub"},
            "secret": {"secret": "models-key", "key": "acme.pub"}}


def pod_owners(r: engine.Rendered) -> list[Obj]:
    return [o for o in r.objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def containers(owner: Obj) -> list[Obj]:
    spec = owner["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@pytest.mark.parametrize("kind", KEY_FROM)
@pytest.mark.parametrize("storage", ["emptyDir", "perPodPVC"])
def test_a_trust_key_reaches_every_fetch_read_only(kind: str, storage: str) -> None:
    values = {"fetch": {"trustKey": KEY_FROM[kind]}, "p2p": {"enabled": True},
              "storage": {"mode": storage}}
    for version in (engine.SUPPORTED_KUBERNETES[0], engine.SUPPORTED_KUBERNETES[-1]):
        assert engine.lint(CHART, values, kube_version=version) == []
    r = render(values)
    # the official schemas (kubernetes-validate) and the restricted Pod Security Standard
    assert check_objects(r.objects + r.hooks, engine.effective_values(CHART, values)) == ([], [], [])
    owners = pod_owners(r)
    assert sorted(o["kind"] for o in owners) == sorted(
        ["DaemonSet", "StatefulSet" if storage == "perPodPVC" else "Deployment"])
    for owner in owners:  # the servers' fetch and the seeders' fetch alike
        (volume,) = [v for v in owner["spec"]["template"]["spec"]["volumes"] if v["name"] == "trust-key"]
        source = volume["configMap"] if kind == "configMap" else volume["secret"]
        assert source.get("name", source.get("secretName")) == "models-key"
        assert source["items"] == [{"key": "acme.pub", "path": "trust.pub"}]
        for c in containers(owner):
            mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if c["name"] != "fetch":  # serve and seed never read it
                assert "trust-key" not in mounts and "WEIGHTSHIP_TRUST_KEY" not in env
                continue
            assert mounts["trust-key"]["readOnly"] is True
            assert env["WEIGHTSHIP_TRUST_KEY"] == mounts["trust-key"]["mountPath"] + "/trust.pub"


def test_no_trust_key_by_default_and_one_source_of_it() -> None:
    for owner in pod_owners(render({"p2p": {"enabled": True}})):
        assert all(v["name"] != "trust-key" for v in owner["spec"]["template"]["spec"]["volumes"])
        assert all("WEIGHTSHIP_TRUST_KEY" not in {e["name"] for e in c.get("env", [])}
                   for c in containers(owner))
    with pytest.raises(InvalidValuesError) as info:
        render({"fetch": {"trustKey": {"configMap": "a", "secret": "b"}}})
    assert any("fetch.trustKey: set configMap (a) or secret (b), not both" in p
               for p in info.value.problems), info.value.problems
    with pytest.raises(InvalidValuesError) as info:
        render({"fetch": {"trustKey": {"configMap": "Not A Name"}}})
    assert any("/fetch/trustKey/configMap" in p for p in info.value.problems), info.value.problems


def _run_as_the_kubelet_would(owner: Obj, files: dict[str, dict[str, bytes]], root: Path) -> Result:
    """Run the owner's fetch init container here: each volume it mounts is a directory under
    ``root`` (a ConfigMap's or Secret's items written into it, as the kubelet projects them,
    from ``files``: name → key → bytes), and each mount path in its args and env points there."""
    spec = owner["spec"]["template"]["spec"]
    (fetch,) = [c for c in spec["initContainers"] if c["name"] == "fetch"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    where: dict[str, str] = {}
    for m in fetch["volumeMounts"]:
        host = root / m["name"]
        host.mkdir(parents=True)
        v = volumes[m["name"]]
        projected = v.get("configMap") or v.get("secret")
        if projected:
            data = files[projected.get("name") or projected["secretName"]]
            for item in projected["items"]:
                (host / item["path"]).write_bytes(data[item["key"]])
        where[m["mountPath"]] = str(host)

    def here(text: str) -> str:
        for mount, host in where.items():
            if text == mount or text.startswith(mount + "/"):
                return host + text[len(mount):]
        return text

    assert fetch["command"] == ["weightship"]
    env = {e["name"]: here(e["value"]) for e in fetch["env"] if "value" in e}
    return run_cli(*[here(a) for a in fetch["args"]], env=env)


def test_the_rendered_fetch_trusts_the_mounted_key(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """The fetch init container as rendered, run with its volumes laid out as the kubelet would,
    fetches a model whose signed manifest a plain-HTTP server holds; the same container rendered
    without fetch.trustKey is refused (an unsigned manifest over plain HTTP is no anchor)."""
    served = tmp_path / "srv"
    shutil.copytree(tiny_hf_dir, served)
    private = tmp_path / "acme.pem"
    public = generate_key(private)
    sign_directory(served, private)
    files = {"models-key": {"acme.pub": public.read_bytes()}}
    with serve(served) as s:
        model = {"name": s.url, "dir": "tiny"}
        signed = render({"model": model, "fetch": {"trustKey": KEY_FROM["configMap"]}})
        ok = _run_as_the_kubelet_would(pod_owners(signed)[0], files, tmp_path / "with")
        plain = render({"model": model})
        refused = _run_as_the_kubelet_would(pod_owners(plain)[0], files, tmp_path / "without")
    assert ok.code == 0, ok.stderr
    got = Manifest.load(tmp_path / "with" / "models" / "tiny")
    assert {f.anchor for f in got.files} == {"signed-manifest"}
    assert_same_files(served, tmp_path / "with" / "models" / "tiny")
    assert_clean_failure(refused, 1)
    assert "unsigned manifest over plain HTTP" in refused.stderr, refused.stderr
    assert not (tmp_path / "without" / "models" / "tiny" / "model.safetensors").exists()
