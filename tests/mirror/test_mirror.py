"""``weightship mirror`` read by the real huggingface_hub client (and transformers)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.conftest import Pki, assert_clean_failure, run_cli
from weightship.manifest import Manifest
from weightship.mirror import MirrorServer
from weightship.mirror.server import Tls


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_snapshot_download_gets_every_file(hub_mirror: str, hub_root: Path, tmp_path: Path) -> None:
    got = Path(snapshot_download("weightship/tiny", endpoint=hub_mirror, cache_dir=tmp_path / "cache"))
    want = Manifest.load(hub_root / "weightship" / "tiny")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == \
        sorted(f.path for f in want.files)
    for f in want.files:
        assert _sha(got / f.path) == f.sha256


def test_hf_hub_download_of_a_large_file_and_its_metadata(hub_mirror: str, hub_root: Path,
                                                          tmp_path: Path) -> None:
    path = hf_hub_download("weightship/big", "extra-00001.safetensors", endpoint=hub_mirror,
                           local_dir=tmp_path / "d")
    entry = Manifest.load(hub_root / "weightship" / "big").entry("extra-00001.safetensors")
    assert entry is not None and _sha(Path(path)) == entry.sha256
    info = HfApi(endpoint=hub_mirror).model_info("weightship/big", files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings or []}
    assert sib["extra-00001.safetensors"].lfs is not None
    assert sib["extra-00001.safetensors"].lfs.sha256 == entry.sha256
    config = (hub_root / "weightship" / "big" / "config.json").read_bytes()
    assert sib["config.json"].lfs is None
    assert sib["config.json"].blob_id == hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    tree = {f.path: f for f in HfApi(endpoint=hub_mirror).list_repo_tree("weightship/big", recursive=True)}
    assert tree.keys() == sib.keys()


def test_resolve_speaks_the_hub_headers_and_ranges(hub_mirror: str, hub_root: Path) -> None:
    repo = hub_root / "weightship" / "tiny"
    data = (repo / "model.safetensors").read_bytes()
    url = f"{hub_mirror}/weightship/tiny/resolve/main/model.safetensors"
    head = httpx.head(url)
    commit = HfApi(endpoint=hub_mirror).model_info("weightship/tiny").sha
    assert head.status_code == 200 and head.headers["x-repo-commit"] == commit
    assert head.headers["x-linked-etag"].strip('"') == hashlib.sha256(data).hexdigest()
    assert int(head.headers["x-linked-size"]) == int(head.headers["content-length"]) == len(data)
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = httpx.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    pinned = f"{hub_mirror}/weightship/tiny/resolve/{commit}/model.safetensors"
    assert httpx.get(pinned, headers={"Range": "bytes=0-9"}).content == data[:10]


def test_missing_things_raise_the_hubs_own_errors(hub_mirror: str, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("weightship/nope", "config.json", endpoint=hub_mirror, cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("weightship/tiny", "nope.json", endpoint=hub_mirror, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        HfApi(endpoint=hub_mirror).model_info("weightship/tiny", revision="v9")
    assert httpx.get(f"{hub_mirror}/weightship/tiny/resolve/main/../../etc/passwd").status_code == 404


def test_transformers_loads_config_and_tokenizer_from_the_mirror(hub_mirror: str, tmp_path: Path) -> None:
    code = ("from transformers import AutoConfig, AutoTokenizer;"
            "c = AutoConfig.from_pretrained('weightship/tiny');"
            "t = AutoTokenizer.from_pretrained('weightship/tiny', tokenizer_type='mistral');"
            "print(c.model_type, c.hidden_size, len(t), *t('Hello world').input_ids)")
    env = {**os.environ, "HF_ENDPOINT": hub_mirror, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    model_type, _hidden, vocab, *ids = p.stdout.split()
    # the real Mistral v1 tokenizer: <s> Hello world
    assert model_type == "mistral" and int(vocab) == 32000 and ids == ["1", "22557", "1526"]


def test_token_file_gates_every_request(hub_root: Path, tmp_path: Path) -> None:
    with MirrorServer(hub_root, tokens=frozenset({"s3cret"})) as m:
        with pytest.raises(GatedRepoError):
            hf_hub_download("weightship/tiny", "config.json", endpoint=m.url, cache_dir=tmp_path / "a")
        ok = hf_hub_download("weightship/tiny", "config.json", endpoint=m.url, token="s3cret",
                             cache_dir=tmp_path / "b")
        assert json.loads(Path(ok).read_text())["model_type"] == "mistral"
        env = {"HF_ENDPOINT": m.url, "HF_TOKEN": ""}
        r = run_cli("fetch", "hf://weightship/tiny", "--to", tmp_path / "x", env=env)
        assert_clean_failure(r, 1)
        assert "gated" in r.stderr and "token" in r.stderr  # issue 17 item 6's one message
        r = run_cli("fetch", "hf://weightship/tiny", "--to", tmp_path / "y", env={**env, "HF_TOKEN": "s3cret"})
        assert r.code == 0, r.stderr


def test_the_mirror_command_serves(hub_root: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "weightship", "mirror", str(hub_root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        assert r.json() == {"status": "ok"}  # no token file: the counts are told to no one
        got = hf_hub_download("weightship/tiny", "config.json", endpoint=f"http://127.0.0.1:{port}",
                              cache_dir=tmp_path)
        assert json.loads(Path(got).read_text())["model_type"] == "mistral"
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_mirror_serves_https(hub_root: Path, pki: Pki, tmp_path: Path, no_ca_env: None) -> None:
    want = Manifest.load(hub_root / "weightship" / "tiny")
    with MirrorServer(hub_root, tokens=frozenset({"s3cret"}), tls=Tls(pki.cert, pki.key)) as m:
        assert m.url.startswith("https://")
        env = {"HF_ENDPOINT": m.url, "HF_TOKEN": "s3cret"}
        trusted = {**env, "SSL_CERT_FILE": str(pki.ca)}
        code = f"from huggingface_hub import snapshot_download; print(snapshot_download('weightship/tiny', " \
               f"cache_dir={str(tmp_path / 'hf')!r}))"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, **trusted}, timeout=120)
        ours = run_cli("fetch", "hf://weightship/tiny", "--to", tmp_path / "ws", env=trusted)
        refused = run_cli("fetch", "hf://weightship/tiny", "--to", tmp_path / "no", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert all(_sha(Path(p.stdout.strip()) / f.path) == f.sha256 for f in want.files)
    assert ours.code == 0, ours.stderr
    assert all(_sha(tmp_path / "ws" / f.path) == f.sha256 for f in want.files)
    assert_clean_failure(refused, 1)
    assert "TLS failed" in refused.stderr and "SSL_CERT_FILE" in refused.stderr, refused.stderr


def test_the_mirror_checks_its_tls_files_before_it_starts(hub_root: Path, pki: Pki) -> None:
    r = run_cli("mirror", hub_root, "--tls-cert", pki.cert, timeout=60)
    assert_clean_failure(r, 2)
    assert "--tls-key" in r.stderr
    r = run_cli("mirror", hub_root, "--tls-cert", pki.cert, "--tls-key", pki.ca, timeout=60)  # not a key
    assert_clean_failure(r, 2)
    assert "--tls-key" in r.stderr and "serving" not in r.stderr
