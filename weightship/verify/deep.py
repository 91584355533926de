"""Deep checks of a model directory's weights, beyond digests.

- every tensor's name and shape against the model's architecture (from ``config.json``,
  ``params.json`` or the catalog card), across all safetensors shards, and the HF shard index;
- a scan of every floating-point tensor for NaN and Inf, reading the data section through a
  read-only memory map only after the header has been validated.

numpy is imported by the scan only: a fetch imports this package (for its digests) and never
scans (numpy took about 110 ms of a 1.5 s ``weightship fetch``, issue 22).
"""

from __future__ import annotations

import json
from pathlib import Path

from weightship.catalog.architecture import Architecture
from weightship.errors import CatalogError
from weightship.verify.safetensors import SafetensorsHeader

# dtype -> (numpy's unsigned view, mask, value): an element is NaN/Inf when (bits & mask) == value
_NONFINITE = {
    "BF16": ("uint16", 0x7F80, 0x7F80),
    "F16": ("uint16", 0x7C00, 0x7C00),
    "F32": ("uint32", 0x7F800000, 0x7F800000),
    "F64": ("uint64", 0x7FF0000000000000, 0x7FF0000000000000),
    "F8_E5M2": ("uint8", 0x7C, 0x7C),
    "F8_E4M3": ("uint8", 0x7F, 0x7F),  # E4M3FN has no Inf; 0x7F/0xFF are NaN
}
_SCAN_CHUNK = 64 << 20  # bytes per slice of the map


def detect_layout(directory: Path) -> str | None:
    """"hf" or "original", from which config file the directory holds (without parsing it)."""
    if (directory / "config.json").is_file():
        return "hf"
    if (directory / "params.json").is_file():
        return "original"
    return None


def directory_architecture(directory: Path) -> tuple[Architecture, str] | None:
    """The architecture and layout a model directory declares, if it declares one."""
    try:
        if (directory / "config.json").is_file():
            arch = Architecture.from_hf_config(json.loads((directory / "config.json").read_text()))
            return arch, "hf"
        if (directory / "params.json").is_file():
            arch = Architecture.from_mapping(json.loads((directory / "params.json").read_text()))
            return arch, "original"
    except (ValueError, OSError) as e:
        raise CatalogError(f"{directory}: cannot read the model's config: {e}") from None
    return None


def check_architecture(headers: list[SafetensorsHeader], arch: Architecture, layout: str,
                       labels: dict[Path, str]) -> list[tuple[str, str]]:
    """Problems (file, reason) where the tensors differ from what ``arch`` implies."""
    expected = arch.tensor_shapes(layout)
    problems: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for h in headers:
        label = labels.get(h.path, str(h.path))
        for name, t in h.tensors.items():
            if name in seen:
                problems.append((label, f"tensor {name!r} is also in {seen[name]}"))
                continue
            seen[name] = label
            if name not in expected:
                problems.append((label, f"unexpected tensor {name!r} for this architecture"))
            elif t.shape != expected[name]:
                problems.append((label, f"tensor {name!r} has shape {list(t.shape)}, "
                                        f"the architecture says {list(expected[name])}"))
    missing = sorted(set(expected) - set(seen))
    if missing and headers:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        problems.append((labels.get(headers[0].path, "weights"),
                         f"missing tensors: {', '.join(missing[:3])}{more}"))
    return problems


def check_index(directory: Path, headers: list[SafetensorsHeader],
                labels: dict[Path, str]) -> list[tuple[str, str]]:
    """Problems with ``model.safetensors.index.json``: its weight map must match the shards."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return [(index.name, "not a valid safetensors index (no weight_map)")]
    actual = {name: labels.get(h.path, h.path.name) for h in headers for name in h.tensors}
    problems = [(index.name, f"maps {name!r} to {shard!r}, but it is in {actual.get(name)!r}")
                for name, shard in sorted(weight_map.items()) if actual.get(name) != shard]
    problems += [(index.name, f"does not list tensor {name!r}")
                 for name in sorted(set(actual) - set(weight_map))]
    return problems[:20]


def scan_nonfinite(header: SafetensorsHeader) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an Inf."""
    bad: list[str] = []
    if not any(t.dtype in _NONFINITE and t.end > t.begin for t in header.tensors.values()):
        return bad
    import numpy as np

    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    try:
        for t in sorted(header.tensors.values(), key=lambda t: t.begin):
            spec = _NONFINITE.get(t.dtype)
            if spec is None or t.end == t.begin:
                continue
            name, mask, value = spec
            view = np.dtype(name).type
            width = np.dtype(view).itemsize
            start, stop = header.data_start + t.begin, header.data_start + t.end
            step = _SCAN_CHUNK - _SCAN_CHUNK % width
            for lo in range(start, stop, step):
                bits = data[lo:min(lo + step, stop)].view(view)
                if np.any((bits & view(mask)) == view(value)):
                    bad.append(t.name)
                    break
    finally:
        del data
    return bad
