"""Malformed and hostile safetensors files: each refused with a clear error, before any mmap."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_clean_failure, run_cli
from weightship.catalog.tiny import safetensors_bytes
from weightship.errors import MalformedWeightsError
from weightship.manifest import create_for_directory
from weightship.verify import verify_dir
from weightship.verify.safetensors import read_header


def _file(header: object, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED: dict[str, tuple[bytes, str]] = {
    "header length 0": (struct.pack("<Q", 0) + b"{}", "header length is 0"),
    "shorter than 8 bytes": (b"\x10\x00\x00", "shorter than the 8-byte"),
    "over the limit": (struct.pack("<Q", 100_000_001) + b"{}", "over the"),
    "u64 max": (struct.pack("<Q", 2**64 - 1) + b"{}", "over the"),
    "longer than the file": (struct.pack("<Q", 500) + b'{"a": 1}', "runs past the end"),
    "not utf-8": (_file(None, raw_header=b'{"\xff\xfe": 1}'), "not UTF-8"),
    "not json": (_file(None, raw_header=b"{this is not json}"), "not JSON"),
    "deeply nested json": (_file(None, raw_header=b'{"a":' + b"[" * 200_000), "not JSON"),
    "not an object": (_file(None, raw_header=b"[1, 2, 3]"), "does not start"),
    "overlapping offsets": (_file({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, bytes(12)),
                            "overlaps"),
    "gap": (_file({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, bytes(12)), "gap of 4"),
    "shape overflows": (_file({"a": _t("F32", [2**40, 2**40], 0, 0)}), "overflows"),
    "shape disagrees with offsets": (_file({"a": _t("F32", [3], 0, 8)}, bytes(8)), "is 12 bytes"),
    "unknown dtype": (_file({"a": _t("F128", [1], 0, 16)}, bytes(16)), "unknown dtype"),
    "negative dim": (_file({"a": _t("F32", [-1], 0, 0)}), "invalid shape"),
    "offsets past the data": (_file({"a": _t("F32", [4], 0, 16)}, bytes(8)), "cover 16 bytes"),
    "trailing bytes": (_file({"a": _t("F32", [1], 0, 4)}, bytes(12)), "data section holds 12"),
    "bad metadata": (_file({"__metadata__": {"k": 1}, "a": _t("U8", [1], 0, 1)}, b"x"), "__metadata__"),
    "bool as int": (_file({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"x"),
                    "invalid shape"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_rejected(tmp_path: Path, case: str) -> None:
    blob, reason = MALFORMED[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(MalformedWeightsError) as info:
        read_header(path)
    assert reason in str(info.value)


@pytest.mark.parametrize("case", ["header length 0", "not json", "overlapping offsets", "shape overflows"])
def test_deep_verify_cli_reports_malformed_file(tmp_path: Path, case: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(MALFORMED[case][0])
    create_for_directory(d).write(d)
    assert run_cli("verify", d).code == 0  # the digest matches its (local) manifest...
    r = run_cli("verify", d, "--deep")  # ...but the file is not a valid safetensors file
    assert_clean_failure(r, 3)
    assert "malformed" in r.stdout and "model.safetensors" in r.stdout


@pytest.mark.parametrize("claimed", [50_000_000, 16 << 30])
def test_sparse_file_with_only_a_length_is_rejected_fast(tmp_path: Path, claimed: int) -> None:
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", claimed))
        f.truncate(20 << 30)  # 20 GiB, sparse: reading it all would take minutes
    start = time.monotonic()
    with pytest.raises(MalformedWeightsError):
        read_header(path)
    assert time.monotonic() - start < 1.0


def test_nan_and_inf_are_found(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    good = np.full((4, 4), 0x3F80, dtype="<u2")  # bf16 1.0
    nan = good.copy()
    nan[2, 3] = 0x7FC0  # bf16 NaN
    inf = np.ones(8, dtype="<f4")
    inf[5] = np.inf
    (d / "model.safetensors").write_bytes(safetensors_bytes({"ok": good, "bad": nan}))
    (d / "other.safetensors").write_bytes(safetensors_bytes({"x": inf.view("<u4")}, dtype="F32"))
    create_for_directory(d).write(d)
    report = verify_dir(d, deep_check=True, record=False)
    found = {(p.path, p.status) for p in report.problems}
    assert ("model.safetensors", "nonfinite") in found and ("other.safetensors", "nonfinite") in found
    assert "bad" in next(p.detail for p in report.problems if p.path == "model.safetensors")


def test_wrong_shape_for_the_architecture_is_found(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    config["intermediate_size"] = 512  # the weights were made for 384
    (tiny_copy / "config.json").write_text(json.dumps(config))
    create_for_directory(tiny_copy).write(tiny_copy)
    report = verify_dir(tiny_copy, deep_check=True, record=False)
    assert not report.ok
    assert any(p.status == "architecture" and "mlp" in p.detail for p in report.problems)
