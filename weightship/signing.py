"""Signed manifests: the OpenSSF model-signing format (PyPI ``model-signing``), key-based, offline.

**What is signed.** weightship's manifest, ``DIR/.weightship/manifest.json``, as a one-file model,
with model-signing's own file serialization. The signature, ``DIR/.weightship/manifest.sig``
(:data:`SIGNATURE_NAME`), is a Sigstore bundle holding a DSSE envelope whose in-toto statement
carries the manifest's sha256. The manifest lists every file's path, size and sha256, so the
signature covers every byte of the model through it.

**Why the manifest rather than the model directory.** A fetch must know that the digests it
enforces come from the key's holder *before* it downloads the files (14.5 GB for Mistral 7B).
Signing the directory itself the OpenSSF way gives one digest per file and no sizes; the public
API checks such a signature only against files already on disk, and reading the statement first
would mean reaching into model-signing's private verifier. A signed manifest is checked with the
public API over two small files (:func:`verify_manifest`); its digests then bind every file, and
its sizes let the fetch refuse a wrong file before writing a byte of it. The pair verifies with
model-signing's own CLI too::

    model_signing verify key DIR/.weightship/manifest.json \\
        --signature DIR/.weightship/manifest.sig --public_key key.pub
    weightship verify DIR        # then the files against the manifest

**What a signature does not say.** Which manifest is current: an older manifest signed with the
same key stays valid (a replay). Pin what must not roll back with a catalog card or
``--manifest``. Rewriting a manifest (a fetch, ``convert``) makes its old signature void, so
:meth:`weightship.manifest.Manifest.write` removes it; sign again to republish.

**Keys.** An elliptic-curve key pair in PEM (P-256, P-384 or P-521): :func:`generate_key`
(``weightship manifest keygen``), or ``openssl ecparam -name prime256v1 -genkey -noout -out key.pem``
and ``openssl ec -in key.pem -pubout -out key.pub``. model-signing is imported only here, only
when signing or verifying, and without its Sigstore and certificate back-ends, which weightship
does not use (see :func:`_model_signing`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import logging
import os
import sys
import tempfile
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from weightship.errors import ManifestError, SignatureError, UsageError
from weightship.manifest import MANIFEST_NAME, SIGNATURE_NAME, atomic_write, manifest_path

log = logging.getLogger(__name__)

_PEM_PUBLIC = "-----BEGIN PUBLIC KEY-----"


@dataclass(frozen=True)
class TrustKey:
    """A public key a user trusts to sign manifests, and where it was configured."""

    pem: bytes
    origin: str  # "--trust-key key.pub", "card acme-7b", … (for messages)


def load_trust_key(value: str | Path, origin: str) -> TrustKey:
    """A trusted public key from a PEM text (a card's ``trust_key:``) or a file path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    text = str(value).strip()
    if text.startswith(_PEM_PUBLIC):
        pem = text.encode() + b"\n"
    else:
        try:
            pem = Path(text).expanduser().read_bytes()
        except OSError as e:
            raise UsageError(f"{origin}: cannot read the public key {text}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise UsageError(f"{origin}: not a PEM public key ({e})",
                         hint="give the .pub file of `weightship manifest keygen`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UsageError(f"{origin}: not an elliptic-curve public key",
                         hint="model-signing's key mode signs with P-256, P-384 or P-521 keys")
    return TrustKey(pem=pem, origin=origin)


def signature_path(directory: Path) -> Path:
    """Where the signature of ``directory``'s manifest lives."""
    return manifest_path(directory).with_name(SIGNATURE_NAME)


def generate_key(private: Path) -> Path:
    """Write a new P-256 key pair: ``private`` (mode 0600) and ``private`` + ``.pub``; returns
    the public key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = private.with_name(private.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def sign_directory(directory: Path, key: Path, *, password: str | None = None) -> Path:
    """Sign ``directory``'s manifest with the private ``key``; returns the signature's path.

    The manifest is read as it is on disk (the bytes a reader will fetch) and checked against the
    schema first: a signature over a manifest nobody can use would only mislead.
    """
    from weightship.manifest import Manifest

    model_signing = _model_signing()

    source = manifest_path(directory)
    Manifest.load(source)  # it parses and follows the schema
    if not key.is_file():
        raise UsageError(f"no private key at {key}", hint="make one with `weightship manifest keygen KEY`")
    target = signature_path(directory)
    with tempfile.TemporaryDirectory(prefix="weightship-sign-") as tmp:
        copy = Path(tmp) / MANIFEST_NAME
        copy.write_bytes(source.read_bytes())
        out = Path(tmp) / SIGNATURE_NAME
        try:
            model_signing.signing.Config().use_elliptic_key_signer(
                private_key=key, password=password).sign(copy, out)
        except (ValueError, TypeError) as e:  # cryptography's errors for a bad or locked key
            raise UsageError(f"cannot sign with {key}: {e}",
                             hint="give an unencrypted elliptic-curve private key in PEM") from None
        if copy.read_bytes() != source.read_bytes():
            raise ManifestError(f"{source} changed while it was being signed; sign it again")
        atomic_write(target, out.read_bytes())
    return target


def verify_manifest(manifest: bytes, signature: bytes, keys: Sequence[TrustKey], *,
                    where: str) -> TrustKey:
    """The key that signed ``manifest`` (its exact bytes) in ``signature``; :class:`SignatureError`
    (exit 3) when none of ``keys`` did. ``where`` names the manifest in messages."""
    model_signing = _model_signing()
    assert keys, "verify_manifest needs at least one key"
    problems = []
    with tempfile.TemporaryDirectory(prefix="weightship-verify-") as tmp:
        copy, sig = Path(tmp) / MANIFEST_NAME, Path(tmp) / SIGNATURE_NAME
        copy.write_bytes(manifest)
        sig.write_bytes(signature)
        for i, key in enumerate(keys):
            pub = Path(tmp) / f"key{i}.pub"
            pub.write_bytes(key.pem)
            try:
                # model-signing prints a notice about old signature formats on stdout, which is
                # the command's result when piped: send it to stderr.
                with contextlib.redirect_stdout(sys.stderr):
                    model_signing.verifying.Config().use_elliptic_key_verifier(
                        public_key=pub).verify(copy, sig)
            except Exception as e:  # a wrong key, a changed manifest, a malformed bundle
                problems.append(f"{key.origin}: {_first_line(e)}")
                continue
            log.info("%s: signature verified with %s", where, key.origin)
            return key
    raise SignatureError(f"{where}: the signature does not verify with any trusted key ("
                         + "; ".join(problems) + ")",
                         hint="the manifest or its signature was changed, or it was signed with "
                              "another key; ask the publisher for their public key")


# model-signing's back-ends that a key signature never touches: its public ``signing`` and
# ``verifying`` modules import them at load, and with them sigstore, tuf, securesystemslib and
# boto3: about 250 ms of every signed fetch.
_UNUSED_BACKENDS = ("model_signing._signing.sign_sigstore", "model_signing._signing.sign_certificate")


class _OnFirstUse(types.ModuleType):
    """A module that is imported for real the first time one of its names is read."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # the import system's questions (``__path__``, …): not a use
            raise AttributeError(name)
        sys.modules.pop(self.__name__, None)
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)
        return getattr(real, name)


def _model_signing() -> types.ModuleType:
    """``model_signing``, with :data:`_UNUSED_BACKENDS` imported only if something reads them
    (their code is the same, run later; a key signature runs none of it)."""
    if "model_signing" not in sys.modules:
        for name in _UNUSED_BACKENDS:
            module = _OnFirstUse(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules.setdefault(name, module)
    import model_signing

    return model_signing


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)
