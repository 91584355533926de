"""``weightship fetch`` + ``weightship verify``: exit 0 on a good directory, 3 naming bad files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_clean_failure, run_cli
from weightship.manifest import Manifest
from weightship.verify import verify_dir
from weightship.verify.digests import hash_files

TINY_FILES = ["config.json", "model.safetensors", "tokenizer.model"]


def test_fetch_then_verify_exits_zero(tmp_path: Path) -> None:
    d = tmp_path / "d"
    r = run_cli("fetch", "weightship-tiny", "--to", d)
    assert r.code == 0, r.stderr
    r = run_cli("verify", d)
    assert r.code == 0, r.stderr
    assert "3 files" in r.stdout
    m = Manifest.load(d)
    assert m.source is not None and m.source.kind == "builtin" and m.verified_at


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", TINY_FILES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_bit_fails_and_names_the_file(tiny_copy: Path, name: str, where: str) -> None:
    size = (tiny_copy / name).stat().st_size
    _flip(tiny_copy / name, {"first": 0, "middle": size // 2, "last": size - 1}[where])
    r = run_cli("verify", tiny_copy)
    assert_clean_failure(r, 3)
    assert name in r.stdout and name in r.stderr
    others = [n for n in TINY_FILES if n != name]
    assert all(f"{o}:" not in r.stderr for o in others)


@pytest.mark.parametrize("name", TINY_FILES)
def test_deleted_file_fails(tiny_copy: Path, name: str) -> None:
    (tiny_copy / name).unlink()
    r = run_cli("--json", "verify", tiny_copy)
    assert r.code == 3
    report = json.loads(r.stdout)
    bad = {f["path"]: f["status"] for f in report["files"] if f["status"] != "ok"}
    assert bad == {name: "missing"}


def test_truncated_and_extra_files_fail(tiny_copy: Path) -> None:
    with open(tiny_copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    (tiny_copy / "model-00002-of-00002.safetensors").write_bytes(b"planted")
    r = run_cli("verify", tiny_copy, "--json")
    assert r.code == 3
    bad = {f["path"]: f["status"] for f in json.loads(r.stdout)["files"] if f["status"] != "ok"}
    assert bad == {"model.safetensors": "size", "model-00002-of-00002.safetensors": "unexpected"}


def test_verify_against_catalog_card(tiny_copy: Path) -> None:
    assert run_cli("verify", tiny_copy, "--model", "weightship-tiny").code == 0
    _flip(tiny_copy / "config.json", 3)
    assert run_cli("verify", tiny_copy, "--model", "weightship-tiny").code == 3


def test_card_without_pins_cannot_verify(tiny_copy: Path) -> None:
    r = run_cli("verify", tiny_copy, "--model", "mistral-7b-v0.1")
    assert_clean_failure(r)
    assert "pins no sha256" in r.stderr


def test_verify_against_external_manifest(tiny_copy: Path, tmp_path: Path) -> None:
    external = tmp_path / "published.json"
    shutil.copy(tiny_copy / ".weightship" / "manifest.json", external)
    (tiny_copy / ".weightship" / "manifest.json").unlink()
    assert run_cli("verify", tiny_copy, "--manifest", external).code == 0
    r = run_cli("verify", tiny_copy)
    assert_clean_failure(r, 1)
    assert "no manifest" in r.stderr


def test_malformed_manifest_is_a_clean_error(tiny_copy: Path) -> None:
    path = tiny_copy / ".weightship" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["files"][0]["sha256"] = "not-a-digest"
    path.write_text(json.dumps(doc))
    r = run_cli("verify", tiny_copy)
    assert_clean_failure(r, 1)
    assert "invalid manifest at files/0/sha256" in r.stderr
    path.write_text("{not json")
    assert_clean_failure(run_cli("verify", tiny_copy), 1)


def test_manifest_naming_an_escaping_path_is_refused(tiny_copy: Path) -> None:
    path = tiny_copy / ".weightship" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["files"][0]["path"] = "../../etc/passwd"
    path.write_text(json.dumps(doc))
    r = run_cli("verify", tiny_copy)
    assert_clean_failure(r, 1)
    assert "unsafe path" in r.stderr


def test_deep_verify_passes_on_both_layouts(tiny_hf_dir: Path, tiny_original_dir: Path) -> None:
    for d in (tiny_hf_dir, tiny_original_dir):
        report = verify_dir(d, deep_check=True, record=False)
        assert report.ok, report.problems


def test_parallel_hashes_equal_hashlib(tmp_path: Path) -> None:
    files = {}
    for i in range(5):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * (i * 100_003 + 7))
        files[p.name] = p
    got = hash_files(files.items(), workers=2)
    for name, p in files.items():
        assert got[name] == (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())


def test_verify_records_when_it_passed(tiny_copy: Path) -> None:
    m = Manifest.load(tiny_copy)
    m.verified_at = "2000-01-01T00:00:00Z"
    m.write(tiny_copy)
    assert run_cli("verify", tiny_copy).code == 0
    assert Manifest.load(tiny_copy).verified_at != "2000-01-01T00:00:00Z"
