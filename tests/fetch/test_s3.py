"""The s3 source and ``weightship push`` against a real S3 server (``rclone serve s3``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import S3Server, assert_clean_failure, run_cli
from tests.fetch.conftest import KeyPair
from tests.fetch.killing import RESUME_BOUND, kill_at_random_points
from tests.net import CountingRelay
from weightship.errors import DigestMismatchError
from weightship.fetch import FetchOptions, TransferOptions, build_request, fetch
from weightship.manifest import Manifest


def _same_files(want: Path, got: Path) -> None:
    assert {f.path: f.sha256 for f in Manifest.load(got).files} == \
        {f.path: f.sha256 for f in Manifest.load(want).files}


def test_push_then_fetch_tiny_then_verify(s3_server: S3Server, tiny_copy: Path, signing_key: KeyPair,
                                          tmp_path: Path) -> None:
    tiny_hf_dir = tiny_copy
    r = run_cli("push", tiny_hf_dir, "s3://models/tiny", "--json", "--key", signing_key.private, env=s3_server.env)
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["signed"] is True
    stored = s3_server.root / "models" / "tiny" / ".weightship"
    assert (stored / "manifest.json").read_bytes() == (tiny_hf_dir / ".weightship" / "manifest.json").read_bytes()
    assert (stored / "manifest.sig").is_file()
    r = run_cli("fetch", "s3://models/tiny", "--to", tmp_path / "m", "--json",
                "--trust-key", signing_key.public, env=s3_server.env)
    assert r.code == 0, r.stderr
    m = json.loads(r.stdout)["manifest"]
    assert m["source"]["kind"] == "s3" and m["source"]["uri"] == "s3://models/tiny"
    assert {f["anchor"] for f in m["files"]} == {"signed-manifest"}
    assert all(f["source"].startswith("s3://models/tiny/") for f in m["files"])
    assert run_cli("verify", tmp_path / "m").code == 0
    _same_files(tiny_hf_dir, tmp_path / "m")


def test_big_model_and_kill_9_resume(s3_env: S3Server, signed_big_dir: Path, signing_key: KeyPair,
                                     tmp_path: Path) -> None:
    """Killed 10 times, then resumed: the model arrives whole, and the bytes S3 sent twice stay
    within the chunks in flight at each kill (counted by a relay in front of rclone)."""
    from weightship.fetch.s3 import push_directory

    big_model_dir = signed_big_dir
    push_directory(big_model_dir, "s3://models/big")  # with the signature already beside it
    total = Manifest.load(big_model_dir).total_bytes
    dest = tmp_path / "m"
    trust = ["--trust-key", str(signing_key.public)]
    port = int(s3_env.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with CountingRelay(port) as relay:
        env = {**s3_env.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"}
        assert run_cli("fetch", "s3://models/big", "--to", tmp_path / "clean", *trust, env=env).code == 0
        overhead = relay.received - total  # one whole fetch's headers, listing, manifest, signature
        relay.received = 0
        landed = kill_at_random_points("s3://models/big", dest, total, kills=10, seed=9, env=env, extra=trust)
        r = run_cli("fetch", "s3://models/big", "--to", dest, "--json", *trust, env=env)
        served = relay.received
    assert r.code == 0, r.stderr
    assert landed >= 5
    assert run_cli("verify", dest).code == 0
    _same_files(big_model_dir, dest)
    again = served - total - (landed + 1) * overhead
    print(f"s3: {landed} kills mid-download, {served - total:,} bytes sent twice or as overhead "
          f"({overhead:,} per fetch), bound {landed * RESUME_BOUND:,}")
    assert 0 < overhead < 1 << 20
    assert again <= landed * RESUME_BOUND, (served - total, overhead, landed)
    # a fresh fetch in-process moves every byte once
    result = fetch(build_request("s3://models/big", options=FetchOptions(
        transfer=TransferOptions(chunk_size=8 << 20), trust_keys=(signing_key.public,))), tmp_path / "n")
    assert result.downloaded_bytes == total


def test_object_etag_is_never_trusted_a_changed_object_is_rejected(
        s3_env: S3Server, signed_tiny_dir: Path, signing_key: KeyPair, tmp_path: Path) -> None:
    from weightship.fetch.s3 import push_directory

    push_directory(signed_tiny_dir, "s3://models/tampered")
    obj = s3_env.root / "models" / "tampered" / "model.safetensors"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))  # same size, new ETag: only the manifest's sha256 can tell
    with pytest.raises(DigestMismatchError):
        fetch(build_request("s3://models/tampered", options=FetchOptions(trust_keys=(signing_key.public,))),
              tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_no_manifest_and_missing_bucket_fail_cleanly(s3_server: S3Server, tmp_path: Path) -> None:
    obj = s3_server.root / "models" / "bare" / "model.safetensors"
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"x" * 1000)
    r = run_cli("fetch", "s3://models/bare", "--to", tmp_path / "a", env=s3_server.env)
    assert_clean_failure(r, 1)
    assert "no manifest" in r.stderr
    r = run_cli("fetch", "s3://nobucket/x", "--to", tmp_path / "b", env=s3_server.env)
    assert_clean_failure(r, 1)
    r = run_cli("fetch", "s3://models/tiny", "--to", tmp_path / "c",
                env={**s3_server.env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert_clean_failure(r, 1)


def test_manifest_option_is_the_anchor_for_a_bare_prefix(s3_server: S3Server, tiny_hf_dir: Path,
                                                         tmp_path: Path) -> None:
    bare = s3_server.root / "models" / "bare-tiny"
    shutil.copytree(tiny_hf_dir, bare, ignore=shutil.ignore_patterns(".weightship"))
    r = run_cli("fetch", "s3://models/bare-tiny", "--to", tmp_path / "m", "--json",
                "--manifest", tiny_hf_dir / ".weightship" / "manifest.json", env=s3_server.env)
    assert r.code == 0, r.stderr
    assert {f["anchor"] for f in json.loads(r.stdout)["manifest"]["files"]} == {"manifest"}
    _same_files(tiny_hf_dir, tmp_path / "m")


def test_push_refuses_a_damaged_directory(s3_server: S3Server, tiny_copy: Path) -> None:
    with open(tiny_copy / "model.safetensors", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe")
    r = run_cli("push", tiny_copy, "s3://models/damaged", env=s3_server.env)
    assert_clean_failure(r, 3)
    assert not (s3_server.root / "models" / "damaged").exists()


def test_a_remote_manifest_over_the_size_cap_is_refused_unread(
        s3_env: S3Server, tiny_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Issue 17, item 7: the S3 source caps a remote manifest like the HTTPS one (64 MiB; here
    the cap is lowered under the tiny model's manifest)."""
    from weightship.errors import FetchError, TransientFetchError
    from weightship.fetch import s3
    from weightship.fetch.s3 import push_directory

    push_directory(tiny_copy, "s3://models/capped")
    size = (tiny_copy / ".weightship" / "manifest.json").stat().st_size
    monkeypatch.setattr(s3, "SMALL_LIMIT", size - 1)
    with pytest.raises(FetchError, match=f"larger than {size - 1} bytes") as refused:
        fetch(build_request("s3://models/capped"), tmp_path / "m")
    assert not isinstance(refused.value, TransientFetchError)  # not asked for again and again


def test_an_unsigned_manifest_over_plain_http_s3_is_refused(s3_server: S3Server, tiny_copy: Path,
                                                            tmp_path: Path) -> None:
    """Issue 17, item 2: pushed without a key, over an http:// endpoint: no anchor."""
    assert run_cli("push", tiny_copy, "s3://models/unsigned", env=s3_server.env).code == 0
    r = run_cli("fetch", "s3://models/unsigned", "--to", tmp_path / "m", env=s3_server.env)
    assert_clean_failure(r, 1)
    assert "unsigned manifest over plain HTTP" in r.stderr and "--trust-key" in r.stderr
    assert not (tmp_path / "m" / "model.safetensors").exists()
