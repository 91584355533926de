"""What the sources built on ranged reads share: the :class:`RangedSource` base and planning
from a manifest (a catalog card, ``--manifest FILE``, or the manifest stored beside the files).

S3 and plain HTTPS carry no digest a client can trust (an S3 ETag is an MD5 only sometimes, and
never a sha256), so those sources take every file's digest from a manifest and refuse to fetch
without one. The anchors, strongest first:

1. ``--manifest FILE``: the user vouches for it (anchor ``manifest``);
2. the catalog card, when it pins every file's size and sha256 (``catalog``);
3. the manifest stored beside the files, *signed* (``PREFIX/.weightship/manifest.sig``, see
   :mod:`weightship.signing`) with a key the user trusts: ``--trust-key PUB`` (or the
   ``WEIGHTSHIP_TRUST_KEY`` variable the CLI reads), or a ``trust_key:`` in the card's source
   entry. The signature is checked before any digest of the manifest is used, and a trusted key
   with no signature, or a signature no trusted key made, is refused (exit 3)
   (``signed-manifest``);
4. that manifest unsigned: no anchor at all, since whoever can change the files can change it.
   Refused over plain ``http://``; over TLS (https, S3 over https) it is taken with a warning
   that names it as the anchor, and recorded as ``unsigned-remote-manifest``, which ``convert``
   never trusts enough to unpickle a file.
"""

from __future__ import annotations

import json
import logging
import posixpath
from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from weightship.errors import ManifestError, NoTrustAnchorError, SignatureError, UnsignedManifestError
from weightship.fetch.base import FetchPlan, PlannedFile, Sink, Source
from weightship.fetch.options import TransferOptions
from weightship.fetch.remote import RangeReader
from weightship.fetch.retry import with_retries
from weightship.fetch.transport import HttpPool
from weightship.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, SourceInfo
from weightship.paths import STATE_DIR

if TYPE_CHECKING:
    from weightship.signing import TrustKey

log = logging.getLogger(__name__)

REMOTE_MANIFEST = f"{STATE_DIR}/{MANIFEST_NAME}"  # where a pushed model keeps its manifest
REMOTE_SIGNATURE = f"{STATE_DIR}/{SIGNATURE_NAME}"  # and the manifest's signature, if signed
UNSIGNED = "unsigned-remote-manifest"
_STREAM_BUFFER = 16 << 20


class RangedSource(Source):
    """A source whose files can be read by byte ranges over HTTP; the engine downloads them in
    parallel."""

    reads_ranges: ClassVar[bool] = True
    _pool: HttpPool | None = None

    def transfer_options(self) -> TransferOptions:
        """How hard to pull, from the request's options."""
        return self.request.options.transfer

    def make_pool(self) -> HttpPool:
        """The connections for this source's downloads (a source may add headers or a CA bundle)."""
        return HttpPool(self.transfer_options())

    @property
    def pool(self) -> HttpPool:
        """The connections all of this source's downloads share, made when first needed."""
        if self._pool is None:
            self._pool = self.make_pool()
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def trust_keys(self) -> list[TrustKey]:
        """The public keys that may sign this source's manifest: ``--trust-key`` (the request's
        ``trust_keys`` option) and the card source entry's ``trust_key``."""
        from weightship.signing import load_trust_key

        keys = [load_trust_key(str(k), f"--trust-key {k}") for k in self.request.options.trust_keys]
        if self.spec.get("trust_key") and self.request.card is not None:
            keys.append(load_trust_key(str(self.spec["trust_key"]),
                                       f"the trust_key of {self.request.card.name}'s {self.kind} source"))
        return keys

    @abstractmethod
    def remote(self, file: PlannedFile) -> RangeReader:
        """A reader for ``file``'s bytes at this source (found by its path, not another
        source's locator, so one plan can be fetched from any of a card's sources)."""

    def fetch_file(self, file: PlannedFile, sink: Sink) -> None:
        """Stream ``file`` from its first byte (the engine normally reads ranges instead)."""
        reader = self.remote(file)
        try:
            st = with_retries(reader.stat, self.transfer_options(), file.path)
            buf = memoryview(bytearray(min(st.size, _STREAM_BUFFER)))
            for start in range(0, st.size, len(buf) or 1):
                end = min(st.size, start + len(buf))
                for view in reader.read_range(start, end, st.validator, buf[:end - start]):
                    sink.write(view)
        finally:
            reader.close()


def plan_from_manifest(source: RangedSource, *, uri: str, revision: str | None,
                       read_remote: Callable[[str], bytes | None], locate: Callable[[str], str],
                       secure: bool) -> FetchPlan:
    """A plan whose digests come from a trust anchor, in the module docstring's order.

    ``read_remote(rel)`` reads a small file under the source's prefix (None when there is none);
    ``secure`` says whether it travels over TLS.
    """
    request = source.request
    name = request.card.name if request.card else posixpath.basename(uri.rstrip("/")) or uri
    layout = request.layout or (request.card.default_layout if request.card else None)
    files: list[PlannedFile] = []
    user_manifest = request.options.manifest
    if user_manifest:
        m = Manifest.load(user_manifest)
        files = [PlannedFile(path=f.path, size=f.size, sha256=f.sha256, anchor="manifest",
                             locator=locate(f.path)) for f in m.files]
        name, layout = (request.card.name if request.card else m.name), m.layout or layout
    elif request.card is not None and _pinned(source):
        card_files = request.card.layout(layout).files or ()
        files = [PlannedFile(path=f.path, size=f.size, sha256=f.sha256, anchor="catalog",
                             locator=locate(f.path)) for f in card_files]
    else:
        m, anchor = _remote_manifest(source, uri, read_remote, secure)
        files = [PlannedFile(path=f.path, size=f.size, sha256=f.sha256, anchor=anchor,
                             locator=locate(f.path)) for f in m.files]
        if request.card is None:
            name, layout = m.name, m.layout or layout
    return FetchPlan(name=name, layout=layout, files=files,
                     source=SourceInfo(kind=source.kind, uri=uri, revision=revision))


def _remote_manifest(source: RangedSource, uri: str, read_remote: Callable[[str], bytes | None],
                     secure: bool) -> tuple[Manifest, str]:
    """The manifest stored beside the files, and the anchor it is (signed or not); refused when
    it is no anchor the module docstring allows."""
    where = f"{uri.rstrip('/')}/{REMOTE_MANIFEST}"
    raw = read_remote(REMOTE_MANIFEST)
    if raw is None:
        raise NoTrustAnchorError(
            f"{uri}: no manifest to take digests from (looked for {REMOTE_MANIFEST})",
            hint="pass --manifest FILE, or upload the model with `weightship push --key KEY` so its "
                 "signed manifest travels with it")
    keys = source.trust_keys()
    signature = read_remote(REMOTE_SIGNATURE)
    if keys:
        if signature is None:
            raise SignatureError(f"{where} is not signed, but a trusted key was given",
                                 hint="the publisher signs with `weightship manifest sign DIR --key KEY` "
                                      "(or `push --key`); without a signature, pass --manifest FILE")
        from weightship.signing import verify_manifest

        verify_manifest(raw, signature, keys, where=where)  # before any digest of it is used
        anchor = "signed-manifest"
    elif not secure:
        raise UnsignedManifestError(
            f"{where}: refusing an unsigned manifest over plain HTTP as the trust anchor: "
            "whoever can change the files on the way can change it too"
            + (" (it is signed: pass the publisher's key)" if signature is not None else ""),
            hint="pass --trust-key PUB (the publisher signs with `weightship manifest sign`), "
                 "or --manifest FILE from a source you trust, or serve it over https")
    else:
        anchor = UNSIGNED
        log.warning("%s: no trust anchor but the manifest this server sent, unsigned: it vouches "
                    "only as far as the server is trusted (recorded as anchor %r)%s; pass "
                    "--trust-key PUB or --manifest FILE for a real anchor", where, UNSIGNED,
                    ", though it is signed" if signature is not None else "")
    try:
        return Manifest.from_dict(json.loads(raw), origin=where), anchor
    except ValueError as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"{where}: not valid JSON ({e})") from None


def _pinned(source: RangedSource) -> bool:
    card = source.request.card
    assert card is not None
    files = card.layout(source.request.layout).files
    return bool(files) and all(f.sha256 and f.size is not None for f in files or ())
