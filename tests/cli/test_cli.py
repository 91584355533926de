"""The CLI contract: version, exit codes, one-line errors, JSON, manifests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import assert_clean_failure, run_cli
from weightship import __version__
from weightship.manifest import Manifest


def test_version() -> None:
    r = run_cli("--version")
    assert r.code == 0 and r.stdout.strip() == f"weightship {__version__}"


def test_usage_errors_exit_2() -> None:
    assert run_cli("verify").code == 2
    assert run_cli("fetch", "weightship-tiny", "--no-such-option").code == 2
    assert run_cli("no-such-command").code == 2


def test_fetch_unknown_layout_is_clean(tmp_path: Path) -> None:
    r = run_cli("fetch", "weightship-tiny", "--layout", "gguf", "--to", tmp_path / "x")
    assert_clean_failure(r, 1)
    assert "no 'gguf' layout" in r.stderr
    assert not (tmp_path / "x").exists()


def test_fetch_with_a_source_the_card_lacks_is_clean(tmp_path: Path) -> None:
    r = run_cli("fetch", "weightship-tiny", "--source", "s3", "--to", tmp_path / "x")
    assert_clean_failure(r, 2)
    assert "no source matching" in r.stderr


def test_json_error_document(tmp_path: Path) -> None:
    r = run_cli("--json", "verify", tmp_path)
    assert r.code == 1
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and "no manifest" in doc["error"] and doc["hint"]


def test_debug_shows_a_traceback_only_when_asked(tmp_path: Path) -> None:
    assert "Traceback" not in run_cli("verify", tmp_path).stderr
    r = run_cli("verify", tmp_path, env={"WEIGHTSHIP_DEBUG": "1"})
    assert r.code == 1 and "Traceback" in r.stderr


def test_quiet_prints_nothing_on_success(tmp_path: Path) -> None:
    r = run_cli("--quiet", "fetch", "weightship-tiny", "--to", tmp_path / "q")
    assert r.code == 0 and r.stdout == "" and r.stderr == ""


def test_default_destination_is_under_weightship_home(tmp_path: Path) -> None:
    r = run_cli("--json", "fetch", "weightship-tiny", env={"WEIGHTSHIP_HOME": str(tmp_path)})
    assert r.code == 0, r.stderr
    assert Path(json.loads(r.stdout)["directory"]) == tmp_path / "models" / "weightship-tiny"


def test_manifest_create_show_and_verify(tmp_path: Path) -> None:
    d = tmp_path / "finetune"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "weights.bin").write_bytes(b"\x01" * 4096)
    r = run_cli("manifest", "create", d, "--name", "acme-7b")
    assert r.code == 0, r.stderr
    m = Manifest.load(d)
    assert m.name == "acme-7b" and [f.path for f in m.files] == ["config.json", "sub/weights.bin"]
    assert m.layout == "hf"
    shown = json.loads(run_cli("manifest", "show", d, "--json").stdout)
    assert shown["files"][1]["size"] == 4096 and shown["manifest_version"] == 1
    assert run_cli("verify", d).code == 0
    again = run_cli("manifest", "create", d)
    assert_clean_failure(again, 2)
    assert "--force" in again.stderr


def test_manifest_create_refuses_symlinks(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").symlink_to("/etc/hostname")
    r = run_cli("manifest", "create", d)
    assert_clean_failure(r, 1)
    assert "symlink" in r.stderr
    assert not (d / ".weightship").exists()
