"""TLS: https:// and s3:// fetches trust the CA bundle the environment names, reuse their TLS
connections, and refuse a certificate nobody vouches for with a clean error (nothing promoted).

The web server and ``rclone serve s3`` present the certificate of :func:`tests.conftest.pki`.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Pki, assert_clean_failure, assert_same_files, rclone_s3, run_cli
from tests.fetch.webserver import FileServer, serve
from weightship.fetch.download import download
from weightship.fetch.options import TransferOptions
from weightship.fetch.transport import HttpPool, HttpRemote
from weightship.manifest import create_for_directory

DATA = hashlib.shake_256(b"tls").digest((1 << 20) + 4321)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls-model") / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(DATA)
    (d / "config.json").write_text('{"model_type": "mistral"}')
    create_for_directory(d).write(d)
    return d


@pytest.fixture
def https(model: Path, pki: Pki, no_ca_env: None) -> Iterator[FileServer]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.cert, pki.key)
    with serve(model, tls=ctx) as s:
        yield s


def test_https_trusts_the_ca_in_SSL_CERT_FILE(https: FileServer, model: Path, pki: Pki,
                                            tmp_path: Path) -> None:
    r = run_cli("fetch", https.url, "--to", tmp_path / "m", env={"SSL_CERT_FILE": str(pki.ca)})
    assert r.code == 0, r.stderr
    assert_same_files(model, tmp_path / "m")


def test_one_tls_connection_carries_every_range(https: FileServer, pki: Pki, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    opts = TransferOptions(connections=1, chunk_size=128 << 10)
    remote = HttpRemote(HttpPool(opts), https.url + "model.safetensors")
    download(remote, tmp_path / "f", expected_size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest(), opts=opts)
    assert (tmp_path / "f").read_bytes() == DATA
    assert https.requests == 9 and https.connections == 1  # 9 ranges, one handshake


def test_an_untrusted_certificate_is_a_clean_error(https: FileServer, tmp_path: Path) -> None:
    r = run_cli("fetch", https.url, "--to", tmp_path / "m")
    assert_clean_failure(r, 1)
    assert "TLS failed" in r.stderr and "SSL_CERT_FILE" in r.stderr, r.stderr
    assert not (tmp_path / "m" / "model.safetensors").exists() and https.requests == 0


def test_a_small_files_whole_get_trusts_the_same_bundle_and_refuses_the_same(
        https: FileServer, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small file's GET (libcurl) trusts the CA of ``SSL_CERT_FILE`` as the ranged reads do, and
    without it refuses the certificate for good: a clean error with the hint, not a retry."""
    from weightship.errors import FetchError, TransientFetchError

    size = len('{"model_type": "mistral"}')
    with pytest.raises(FetchError, match="TLS failed") as refused:
        HttpRemote(HttpPool(TransferOptions()), https.url + "config.json").read_all(size)
    assert not isinstance(refused.value, TransientFetchError)
    assert "SSL_CERT_FILE" in (refused.value.hint or ""), refused.value.hint
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    assert bytes(HttpRemote(HttpPool(TransferOptions()), https.url + "config.json").read_all(size)) == (
        b'{"model_type": "mistral"}')


def test_s3_over_tls_trusts_AWS_CA_BUNDLE(model: Path, pki: Pki, tmp_path: Path, no_ca_env: None) -> None:
    root = tmp_path / "s3"
    shutil.copytree(model, root / "models" / "m")
    with rclone_s3(root, cert=pki.cert, key=pki.key) as s3:
        assert s3.env["AWS_ENDPOINT_URL"].startswith("https://")
        refused = run_cli("fetch", "s3://models/m", "--to", tmp_path / "no", env=s3.env)
        r = run_cli("fetch", "s3://models/m", "--to", tmp_path / "m",
                    env={**s3.env, "AWS_CA_BUNDLE": str(pki.ca)})
    assert_clean_failure(refused, 1)
    assert "TLS failed" in refused.stderr and "AWS_CA_BUNDLE" in refused.stderr, refused.stderr
    assert r.code == 0, r.stderr
    assert_same_files(model, tmp_path / "m")
