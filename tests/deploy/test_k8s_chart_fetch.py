"""What the chart hands `weightship fetch`: the Hub revision (model.revision) and the key that
signed the manifests of s3:// and https:// sources (fetch.trustKey), rendered by Helm's own
engine and checked like every other combination (lint, the official schemas, the restricted
Pod Security Standard)."""

from __future__ import annotations

import re
from typing import Any

import yaml
from k8s_helpers import CHART

from weightship.catalog import load_card
from weightship.deploy.k8s import helm as engine

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
