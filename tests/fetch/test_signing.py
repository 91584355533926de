"""Signed manifests (issue 17, item 2): a manifest the same server sends is an anchor only when a
key the user trusts signed it; unsigned, it is refused over plain HTTP, and over TLS it is a
warned, recorded last resort that ``convert`` never unpickles on.

Signatures are made and checked with PyPI ``model-signing`` (OpenSSF), key-based and offline.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Pki, assert_clean_failure, assert_same_files, run_cli
from tests.fetch.conftest import KeyPair
from tests.fetch.webserver import serve
from weightship.catalog import load_card, parse_card
from weightship.errors import SignatureError
from weightship.fetch import FetchRequest, fetch
from weightship.manifest import Manifest, manifest_path
from weightship.signing import signature_path


def test_sign_then_fetch_over_plain_http_with_the_public_key(tiny_copy: Path, tmp_path: Path) -> None:
    key = tmp_path / "acme.pem"
    r = run_cli("manifest", "keygen", key, "--json")
    assert r.code == 0, r.stderr
    pub = Path(json.loads(r.stdout)["public_key"])
    assert key.stat().st_mode & 0o077 == 0  # the private key is the owner's alone
    r = run_cli("manifest", "sign", tiny_copy, "--key", key)
    assert r.code == 0, r.stderr
    sig = signature_path(tiny_copy)
    assert sig.is_file()
    # the OpenSSF tooling itself verifies the pair: the manifest as a one-file model
    import model_signing

    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(
        manifest_path(tiny_copy), sig)
    with serve(tiny_copy) as s:
        r = run_cli("fetch", s.url, "--to", tmp_path / "m", "--json", "--trust-key", pub)
    assert r.code == 0, r.stderr
    assert {f["anchor"] for f in json.loads(r.stdout)["manifest"]["files"]} == {"signed-manifest"}
    assert_same_files(tiny_copy, tmp_path / "m")
    # the key can come from the environment, as an init container would set it
    with serve(tiny_copy) as s:
        r = run_cli("fetch", s.url, "--to", tmp_path / "e", env={"WEIGHTSHIP_TRUST_KEY": str(pub)})
    assert r.code == 0, r.stderr


def test_a_key_signature_loads_no_sigstore_backend(signed_tiny_dir: Path, signing_key: KeyPair,
                                                   other_key: KeyPair) -> None:
    """Checking a key signature imports neither sigstore, tuf nor boto3 (model-signing's other
    back-ends, about 250 ms), still tells a good signature from a wrong key, and the deferred
    back-ends still load when something reads them."""
    manifest = manifest_path(signed_tiny_dir)
    script = ("import sys\n"
              "from pathlib import Path\n"
              "from weightship.signing import load_trust_key, verify_manifest\n"
              "from weightship.errors import SignatureError\n"
              "m, s = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes()\n"
              "good, wrong = (load_trust_key(k, k) for k in sys.argv[3:5])\n"
              "assert verify_manifest(m, s, [wrong, good], where='m') == good\n"
              "try:\n"
              "    verify_manifest(m, s, [wrong], where='m')\n"
              "except SignatureError:\n"
              "    print('refused')\n"
              "print(sorted({n.split('.')[0] for n in sys.modules} & {'sigstore', 'tuf', 'boto3'}))\n"
              "import model_signing\n"
              "print(model_signing.verifying.sigstore.Verifier.__name__, 'sigstore' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script, manifest, signature_path(signed_tiny_dir),
                          signing_key.public, other_key.public],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["refused", "[]", "Verifier True"]


def test_an_unsigned_manifest_over_plain_http_is_refused(tiny_hf_dir: Path, tmp_path: Path) -> None:
    with serve(tiny_hf_dir) as s:
        r = run_cli("fetch", s.url, "--to", tmp_path / "m")
        sent = s.bytes_served
    assert_clean_failure(r, 1)
    assert "unsigned manifest over plain HTTP" in r.stderr and "--trust-key" in r.stderr, r.stderr
    assert sent < 4096  # the manifest, and no byte of a model file
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_a_changed_signed_manifest_is_refused_before_any_file(
        signed_tiny_dir: Path, signing_key: KeyPair, tmp_path: Path) -> None:
    served = tmp_path / "srv"
    shutil.copytree(signed_tiny_dir, served)
    # the server swaps in another model.safetensors and edits the manifest to match it
    (served / "model.safetensors").write_bytes(b"\0" * 1000)
    from weightship.manifest import create_for_directory

    fresh = create_for_directory(served)
    (served / ".weightship" / "manifest.json").write_text(json.dumps(fresh.to_dict(), indent=2) + "\n")
    manifest_bytes = len((served / ".weightship" / "manifest.json").read_bytes())
    with serve(served) as s:
        r = run_cli("fetch", s.url, "--to", tmp_path / "m", "--trust-key", signing_key.public)
        sent = s.bytes_served
    assert_clean_failure(r, 3)
    assert "signature does not verify" in r.stderr, r.stderr
    assert sent <= manifest_bytes + signature_path(signed_tiny_dir).stat().st_size
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_another_key_or_no_signature_is_refused_with_exit_3(
        signed_tiny_dir: Path, tiny_hf_dir: Path, other_key: KeyPair, signing_key: KeyPair,
        tmp_path: Path) -> None:
    with serve(signed_tiny_dir) as s:
        wrong = run_cli("fetch", s.url, "--to", tmp_path / "a", "--trust-key", other_key.public)
    with serve(tiny_hf_dir) as s:  # unsigned, though the user asked for a signature
        stripped = run_cli("fetch", s.url, "--to", tmp_path / "b", "--trust-key", signing_key.public)
    assert_clean_failure(wrong, 3)
    assert "does not verify with any trusted key" in wrong.stderr
    assert_clean_failure(stripped, 3)
    assert "is not signed" in stripped.stderr
    for d in ("a", "b"):
        assert not (tmp_path / d / "model.safetensors").exists()


def test_a_card_source_can_carry_the_key(signed_tiny_dir: Path, signing_key: KeyPair,
                                         other_key: KeyPair, tmp_path: Path) -> None:
    raw = json.loads(json.dumps(load_card("weightship-tiny").raw))
    # the card pins sizes but no sha256: the signed manifest supplies the digests
    raw["layouts"]["hf"]["files"] = [{"path": f["path"], "size": f["size"]} for f in raw["layouts"]["hf"]["files"]]
    with serve(signed_tiny_dir) as s:
        def request(key: KeyPair) -> FetchRequest:
            raw["sources"] = [{"kind": "https", "url": s.url, "trust_key": key.public.read_text()}]
            return FetchRequest(ref="acme-tiny", card=parse_card({**raw, "name": "acme-tiny"}, "test"))

        result = fetch(request(signing_key), tmp_path / "m")
        with pytest.raises(SignatureError):
            fetch(request(other_key), tmp_path / "n")
    assert {f.anchor for f in result.manifest.files} == {"signed-manifest"}


def test_rewriting_a_manifest_drops_its_signature(signed_tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(signed_tiny_dir, d)
    m = Manifest.load(d)
    m.write(d)  # the same bytes: the signature still holds
    assert signature_path(d).is_file()
    m.verified_at = "2030-01-01T00:00:00Z"
    m.write(d)
    assert not signature_path(d).exists()


# ---- over TLS: a warned, recorded last resort that convert refuses ------------------------------


@pytest.fixture
def tls_server_of(pki: Pki, no_ca_env: None) -> Iterator[object]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.cert, pki.key)

    def start(root: Path) -> object:
        return serve(root, tls=ctx)

    yield start


def test_unsigned_over_tls_is_warned_recorded_and_never_unpickled(
        tiny_original_dir: Path, pki: Pki, tls_server_of: object, tmp_path: Path) -> None:
    served = tmp_path / "srv"
    shutil.copytree(tiny_original_dir, served)
    (served / "consolidated.safetensors").unlink()
    m = Manifest.load(served)
    m.files = [f for f in m.files if f.path != "consolidated.safetensors"]
    m.write(served)
    env = {"SSL_CERT_FILE": str(pki.ca)}
    with tls_server_of(served) as s:  # type: ignore[operator]
        r = run_cli("fetch", s.url, "--to", tmp_path / "m", "--json", env=env)
    assert r.code == 0, r.stderr
    assert "unsigned" in r.stderr and "unsigned-remote-manifest" in r.stderr, r.stderr
    files = json.loads(r.stdout)["manifest"]["files"]
    assert {f["anchor"] for f in files} == {"unsigned-remote-manifest"}
    refused = run_cli("convert", tmp_path / "m")
    assert_clean_failure(refused, 3)
    assert "unsigned manifest" in refused.stderr and "--manifest" in refused.stderr
    assert not (tmp_path / "m" / "consolidated.safetensors").exists()
    # a manifest the user vouches for is a full anchor
    ok = run_cli("convert", tmp_path / "m", "--manifest", served / ".weightship" / "manifest.json")
    assert ok.code == 0, ok.stderr
