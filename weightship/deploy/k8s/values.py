"""Chart values: those derived from the model's catalog card, then the user's (-f, --set).

Precedence follows ``helm install``: the chart's values.yaml < derived values < ``-f`` files in
order < ``--set`` expressions in order. A ``null`` removes a chart default, as in Helm.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from weightship import catalog
from weightship.deploy.k8s.sizing import Sizing, size_model
from weightship.errors import InvalidValuesError, UsageError

log = logging.getLogger(__name__)

Values = dict[str, Any]


@dataclass(frozen=True)
class ModelShape:
    """What the deployer knows about the model before rendering."""

    name: str
    sizing: Sizing | None  # None when the model is a URI with no catalog card


def model_shape(model: str, *, dtype: str | None, max_batch: int, max_model_len: int | None,
                layout: str | None = None) -> ModelShape:
    """Size ``model`` from its catalog card; a URI has no card and gets no sizing."""
    if not catalog.is_catalog_name(model):
        if "://" not in model and not model.startswith("magnet:"):
            catalog.load_card(model)  # raises UnknownModelError listing the known names
        log.warning("%s is not in the catalog: set storage.size and resources yourself", model)
        return ModelShape(model, None)
    card = catalog.load_card(model)
    chosen = card.layout(layout)
    file_bytes = chosen.total_bytes() or chosen.weights_bytes()
    if file_bytes is None:
        raise UsageError(f"the {model} card does not publish its file sizes",
                         hint="pass --set storage.size=… and the resources yourself")
    length = max_model_len or min(8192, card.architecture.max_seq_len)
    sizing = size_model(card.architecture, file_bytes=file_bytes, dtype=dtype or card.dtype,
                        max_batch=max_batch, max_model_len=length)
    return ModelShape(model, sizing)


def derived_values(shape: ModelShape, *, gpus: int) -> Values:
    """The values ``weightship deploy k8s`` sets before the user's own."""
    values: Values = {"model": {"name": shape.name}, "gpu": {"count": gpus}}
    s = shape.sizing
    if s is None:
        return values
    values["model"]["sizeBytes"] = s.file_bytes
    values["storage"] = {"size": s.storage_quantity()}
    values["p2p"] = {"cacheSize": s.storage_quantity()}
    values["serve"] = {"dtype": s.dtype, "maxBatch": s.max_batch, "maxModelLen": s.max_model_len,
                       "resources": {"requests": {"cpu": "4" if gpus else "2",
                                                  "memory": s.host_memory(gpus > 0)["requests"]},
                                     "limits": {"memory": s.host_memory(gpus > 0)["limits"]}}}
    if gpus:
        values["gpu"]["minMemoryMiB"] = s.gpu_memory_mib
    return values


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Values:
    """Helm's coalescing: maps merge key by key, anything else is replaced. A null is kept so
    that Helm drops the chart's default for that key too."""
    out: Values = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            out[key] = None
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_value_files(paths: Iterable[Path]) -> list[Values]:
    """Each ``-f`` file as a mapping."""
    out = []
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise UsageError(f"cannot read values file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise InvalidValuesError([f"{path} is not valid YAML: {e}"]) from None
        if not isinstance(data, dict):
            raise InvalidValuesError([f"{path} must hold a mapping, not {type(data).__name__}"])
        out.append(data)
    return out


def parse_sets(expressions: Iterable[str]) -> list[Values]:
    """Each ``--set`` expression, parsed by Helm's own strvals parser."""
    from weightship.deploy.k8s.helm import helm_module

    helm = helm_module()
    out = []
    for expression in expressions:
        try:
            out.append(helm.parse_set_string(expression))
        except helm.HelmError as e:
            raise InvalidValuesError([f"--set {expression!r}: {e}"]) from None
    return out


def compose(derived: Values, files: Iterable[Values], sets: Iterable[Values]) -> Values:
    """The values a release gets, by ``helm install``'s precedence."""
    values = derived
    for layer in [*files, *sets]:
        values = merge(values, layer)
    return values
