"""The hf source against ``weightship mirror`` (the Hub protocol), through huggingface_hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_clean_failure, run_cli
from tests.fetch.killing import RESUME_BOUND, kill_at_random_points
from weightship.fetch import FetchOptions, TransferOptions, build_request, fetch
from weightship.manifest import Manifest, create_for_directory
from weightship.mirror import MirrorServer


def _same_files(want: Path, got: Path) -> None:
    m = Manifest.load(got)
    assert {f.path: f.sha256 for f in m.files} == {f.path: f.sha256 for f in Manifest.load(want).files}


def test_fetch_tiny_from_the_hub_protocol_then_verify(hub_mirror: str, hub_root: Path, tmp_path: Path) -> None:
    r = run_cli("fetch", "hf://weightship/tiny", "--to", tmp_path / "m", "--json", env={"HF_ENDPOINT": hub_mirror})
    assert r.code == 0, r.stderr
    m = json.loads(r.stdout)["manifest"]
    assert m["source"]["kind"] == "hf" and m["source"]["uri"] == "hf://weightship/tiny"
    assert len(m["source"]["revision"]) == 40
    anchors = {f["path"]: f["anchor"] for f in m["files"]}
    # a mirror's listing, not the public Hub's: recorded as the weak anchor it is
    assert anchors == dict.fromkeys(("config.json", "model.safetensors", "tokenizer.model"),
                                    "unsigned-hub-listing")
    assert all(len(f["sha256"]) == 64 for f in m["files"])
    assert run_cli("verify", tmp_path / "m").code == 0
    _same_files(hub_root / "weightship" / "tiny", tmp_path / "m")
    # pinned to that commit, the same request is a no-op
    rev = m["source"]["revision"]
    r = run_cli("fetch", f"hf://weightship/tiny@{rev}", "--to", tmp_path / "m", "--json",
                env={"HF_ENDPOINT": hub_mirror})
    assert r.code == 0 and json.loads(r.stdout)["fetched"] == []


def test_fetch_big_model(hub_mirror: str, hub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub_mirror)
    options = FetchOptions(transfer=TransferOptions(chunk_size=8 << 20))
    result = fetch(build_request("hf://weightship/big", options=options), tmp_path / "m")
    total = Manifest.load(hub_root / "weightship" / "big").total_bytes
    assert result.downloaded_bytes == total
    _same_files(hub_root / "weightship" / "big", tmp_path / "m")


def test_unknown_repo_and_revision_fail_cleanly(hub_mirror: str, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub_mirror}
    r = run_cli("fetch", "hf://weightship/nope", "--to", tmp_path / "a", env=env)
    assert_clean_failure(r, 1)
    assert "no such repository" in r.stderr
    r = run_cli("fetch", "hf://weightship/tiny@v9", "--to", tmp_path / "b", env=env)
    assert_clean_failure(r, 1)
    assert "no such revision" in r.stderr


@pytest.fixture(scope="module")
def special_root(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> Path:
    """A mirror root whose repo also holds a pickle (``.bin``) beside the safetensors."""
    root = tmp_path_factory.mktemp("special")
    d = root / "weightship" / "withbin"
    shutil.copytree(tiny_hf_dir, d, ignore=shutil.ignore_patterns(".weightship"))
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle" * 100)
    create_for_directory(d).write(d)
    return root


def test_bin_files_only_when_asked(special_root: Path, tmp_path: Path) -> None:
    with MirrorServer(special_root) as m:
        env = {"HF_ENDPOINT": m.url}
        r = run_cli("fetch", "hf://weightship/withbin", "--to", tmp_path / "a", "--json", env=env)
        assert r.code == 0, r.stderr
        assert "pytorch_model.bin" not in json.loads(r.stdout)["fetched"]
        r = run_cli("fetch", "hf://weightship/withbin", "--to", tmp_path / "b", "--json",
                    "--include", "*.bin", "--include", "config.json", env=env)
        assert r.code == 0, r.stderr
        assert sorted(json.loads(r.stdout)["fetched"]) == ["config.json", "pytorch_model.bin"]


def test_a_small_file_that_does_not_match_its_git_blob_id_is_rejected(special_root: Path, tmp_path: Path) -> None:
    repo = special_root / "weightship" / "withbin"
    with MirrorServer(special_root) as m:
        env = {"HF_ENDPOINT": m.url}
        assert run_cli("fetch", "hf://weightship/withbin", "--to", tmp_path / "ok", env=env).code == 0
        config = repo / "config.json"
        original = config.read_bytes()
        try:
            # the mirror described the repo already; now the file changes under it, same size
            config.write_bytes(original.replace(b"mistral", b"mistrel"))
            r = run_cli("fetch", "hf://weightship/withbin", "--to", tmp_path / "bad", env=env)
        finally:
            config.write_bytes(original)
    assert_clean_failure(r, 3)
    assert "git blob sha1 mismatch" in r.stderr
    assert not (tmp_path / "bad" / "config.json").exists()


def test_kill_9_at_random_points_then_resume(hub_root: Path, tmp_path: Path) -> None:
    want = hub_root / "weightship" / "big"
    total = Manifest.load(want).total_bytes
    dest = tmp_path / "m"
    with MirrorServer(hub_root) as m:
        env = {"HF_ENDPOINT": m.url}
        landed = kill_at_random_points("hf://weightship/big", dest, total, kills=10, seed=5, env=env)
        r = run_cli("fetch", "hf://weightship/big", "--to", dest, "--json", env=env)
        served = m.bytes_sent
    assert r.code == 0, r.stderr
    assert run_cli("verify", dest).code == 0
    _same_files(want, dest)
    print(f"hf: {landed} kills mid-download, {served - total:,} bytes served twice "
          f"(bound {landed * RESUME_BOUND:,})")
    assert landed >= 5
    # bytes served twice are bounded by the chunks in flight at each kill
    assert served - total <= landed * RESUME_BOUND, (served - total, landed)
