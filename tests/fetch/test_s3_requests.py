"""Lean S3 requests (issue 22, item 3): each object is one GET signed in headers by weightship's
:class:`~weightship.fetch.s3.ObjectSigner` (what botocore's S3SigV4Auth would send), through the
engine's own pool. Counted on the wire, in front of a real S3 server that checks signatures."""

from __future__ import annotations

import collections
import datetime
import http.server
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import unquote, urlsplit

import pytest

from tests.conftest import S3Server, assert_clean_failure, assert_same_files, run_cli
from tests.fetch.conftest import KeyPair
from tests.net import CountingRelay
from weightship.manifest import create_for_directory

AWKWARD = ["a b/c+d.json", "é/ü~x=1.json", "plain/n%41me.json", "sp  two/x;y,z!.bin"]


def _client(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from weightship.fetch.s3 import make_s3_client

    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return make_s3_client()


@pytest.mark.parametrize("env", [
    {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
    {"AWS_ENDPOINT_URL": "https://s3.example.test:8443", "AWS_SESSION_TOKEN": "the/session+token="},
    {"AWS_DEFAULT_REGION": "eu-west-3"},  # AWS itself: virtual-host addressing, the bucket's region
])
def test_the_signed_headers_are_what_botocore_signs_for_get_object(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Same URL as botocore's own for the key, and the same Authorization as botocore's
    S3SigV4Auth gives that GET at the same instant (so any S3 server botocore works with)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    from weightship.fetch.s3 import ObjectSigner

    client = _client({"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalr/XUtnFEMI+K7MDENG",
                      "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", **env},
                     monkeypatch)
    signer = ObjectSigner.for_bucket(client, "models")
    assert signer is not None
    credentials = client._request_signer._credentials
    for i, key in enumerate(["prefix/model.safetensors", *AWKWARD]):
        presigned = client.generate_presigned_url("get_object", Params={"Bucket": "models", "Key": key})
        url = signer.url(key)
        assert url == presigned.split("?")[0]
        now = datetime.datetime(2026, 12, 6, 23, 59, 50 + i, tzinfo=datetime.timezone.utc)
        ours = signer.headers(url, now)
        theirs = AWSRequest("GET", url)
        with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
            S3SigV4Auth(credentials.get_frozen_credentials(), signer.service, signer.region).add_auth(theirs)
        assert {k.lower(): v for k, v in theirs.headers.items()} == {k: v for k, v in ours.items() if k != "host"}
        assert ours["host"] == urlsplit(url).netloc.removesuffix(":443").removesuffix(":80")
        assert ("x-amz-security-token" in ours) == ("AWS_SESSION_TOKEN" in env)


@pytest.fixture
def awkward_prefix(s3_server: S3Server, tmp_path: Path) -> tuple[dict[str, bytes], Path]:
    """300 small objects under models/lean (awkward names among them), and a manifest of them
    outside the bucket (given with --manifest: the fetch reads nothing from S3 but the objects)."""
    rng = random.Random(5)
    files = {f"d{i % 9}/f{i:04d}.json": json.dumps({"i": i, "pad": "x" * rng.randrange(1, 3000)}).encode()
             for i in range(300 - len(AWKWARD))}
    files.update({name: rng.randbytes(rng.randrange(1, 5000)) for name in AWKWARD})
    prefix = s3_server.root / "models" / "lean"
    for path, data in files.items():
        (prefix / path).parent.mkdir(parents=True, exist_ok=True)
        (prefix / path).write_bytes(data)
    create_for_directory(prefix, name="lean").write(tmp_path)
    return files, tmp_path / ".weightship" / "manifest.json"


def test_each_object_is_one_header_signed_get_on_the_wire(
        s3_server: S3Server, awkward_prefix: tuple[dict[str, bytes], Path], tmp_path: Path) -> None:
    files, manifest = awkward_prefix
    port = int(s3_server.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with CountingRelay(port) as wire:
        env = {**s3_server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{wire.port}"}
        r = run_cli("fetch", "s3://models/lean", "--to", tmp_path / "m", "--manifest", manifest, "--json", env=env)
    assert r.code == 0, r.stderr
    assert len(json.loads(r.stdout)["manifest"]["files"]) == len(files)
    for path, data in files.items():
        assert (tmp_path / "m" / path).read_bytes() == data
    assert {m for m, _ in wire.requests} == {"GET"}, "a HEAD or another request besides the GETs"
    assert not [t for _, t in wire.requests if "?" in t], "a presigned URL: the signature belongs in headers"
    per_key = collections.Counter(unquote(t).removeprefix("/models/lean/") for _, t in wire.requests)
    assert per_key == dict.fromkeys(files, 1)


def test_a_wrong_secret_is_refused_by_the_server_and_nothing_is_promoted(
        s3_server: S3Server, awkward_prefix: tuple[dict[str, bytes], Path], tmp_path: Path) -> None:
    """rclone checks each signature: the same fetch with a wrong secret fails in one line."""
    _, manifest = awkward_prefix
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    r = run_cli("fetch", "s3://models/lean", "--to", tmp_path / "m", "--manifest", manifest, env=env)
    assert_clean_failure(r)
    assert "access denied" in r.stderr.lower(), r.stderr
    promoted = [p for p in (tmp_path / "m").rglob("*") if p.is_file() and ".weightship" not in p.parts]
    assert promoted == []


@pytest.fixture
def redirecting() -> Iterator[tuple[str, list[str]]]:
    """An "S3 endpoint" that answers every request with a 307 to a second server, which records
    what reaches it."""
    reached: list[str] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            reached.append(self.path + " " + str(self.headers.get("authorization")))
            self.send_error(404)

        def log_message(self, *a: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{other.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    first = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for s in (first, other):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{first.server_address[1]}", reached
    finally:
        for s in (first, other):
            s.shutdown()
            s.server_close()


def test_a_redirect_is_not_followed_with_the_signed_headers(
        s3_server: S3Server, awkward_prefix: tuple[dict[str, bytes], Path],
        redirecting: tuple[str, list[str]], tmp_path: Path) -> None:
    endpoint, reached = redirecting
    _, manifest = awkward_prefix
    r = run_cli("fetch", "s3://models/lean", "--to", tmp_path / "m", "--manifest", manifest,
                env={**s3_server.env, "AWS_ENDPOINT_URL": endpoint})
    assert_clean_failure(r)
    assert "307" in r.stderr and "AWS_REGION" in r.stderr, r.stderr
    assert reached == []


def test_where_botocore_signs_otherwise_each_get_is_presigned_by_it(
        s3_env: S3Server, signed_big_dir: Path, signing_key: KeyPair, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SigV4a and S3 Express give no plain SigV4 URL to sign in headers: then each GET, ranged
    reads of a large object over several connections and whole small objects alike, carries a
    URL botocore presigned, and rclone (which checks them) serves the model whole."""
    from weightship.fetch import FetchOptions, TransferOptions, build_request, fetch
    from weightship.fetch.s3 import ObjectSigner, push_directory
    from weightship.manifest import Manifest

    push_directory(signed_big_dir, "s3://models/presigned")
    monkeypatch.setattr(ObjectSigner, "for_bucket", classmethod(lambda cls, client, bucket: None))
    port = int(s3_env.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with CountingRelay(port) as wire:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{wire.port}")
        request = build_request("s3://models/presigned", options=FetchOptions(
            transfer=TransferOptions(chunk_size=8 << 20, connections=4), trust_keys=(signing_key.public,)))
        result = fetch(request, tmp_path / "m")
    manifest = Manifest.load(signed_big_dir)
    assert result.downloaded_bytes == manifest.total_bytes
    assert_same_files(signed_big_dir, tmp_path / "m")
    gets = [t for m, t in wire.requests if m == "GET" and "/.weightship/" not in t and "list-type" not in t]
    assert gets and all("X-Amz-Signature=" in t for t in gets), gets[:3]
    big = max(manifest.files, key=lambda f: f.size)
    assert sum(big.path in unquote(t) for t in gets) >= big.size // (8 << 20), "the large object in ranges"
