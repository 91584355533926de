"""What the sources built on ranged reads share: the :class:`RangedSource` base and planning
from a manifest (a catalog card, ``--manifest FILE``, or the manifest stored beside the files).

S3 and plain HTTPS carry no digest a client can trust (an S3 ETag is an MD5 only sometimes, and
never a sha256), so those sources take every file's digest from a manifest and refuse to fetch
without one.
"""

from __future__ import annotations

import json
import posixpath
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

from weightship.errors import ManifestError, NoTrustAnchorError
from weightship.fetch.base import FetchPlan, PlannedFile, Sink, Source
from weightship.fetch.download import RangeReader, TransferOptions
from weightship.fetch.http import HttpPool
from weightship.manifest import MANIFEST_NAME, Manifest, SourceInfo
from weightship.paths import STATE_DIR

REMOTE_MANIFEST = f"{STATE_DIR}/{MANIFEST_NAME}"  # where a pushed model keeps its manifest
_STREAM_BUFFER = 16 << 20


class RangedSource(Source):
    """A source whose files can be read by byte ranges; the engine downloads them in parallel."""

    _pool: HttpPool | None = None

    def transfer_options(self) -> TransferOptions:
        """How hard to pull, from the request's options."""
        return TransferOptions.from_options(self.request.options)

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

    @abstractmethod
    def remote(self, file: PlannedFile) -> RangeReader:
        """A reader for ``file``'s bytes at this source (found by its path, not another
        source's locator, so one plan can be fetched from any of a card's sources)."""

    def fetch_file(self, file: PlannedFile, sink: Sink) -> None:
        """Stream ``file`` from its first byte (the engine normally reads ranges instead)."""
        reader = self.remote(file)
        try:
            st = reader.stat()
            buf = memoryview(bytearray(min(st.size, _STREAM_BUFFER)))
            for start in range(0, st.size, len(buf) or 1):
                end = min(st.size, start + len(buf))
                for view in reader.read_range(start, end, st.validator, buf[:end - start]):
                    sink.write(view)
        finally:
            reader.close()


def plan_from_manifest(source: Source, *, uri: str, revision: str | None,
                       read_remote_manifest: Callable[[], bytes | None],
                       locate: Callable[[str], str]) -> FetchPlan:
    """A plan whose digests come from a trust anchor, in this order: ``--manifest FILE``, the
    card's pinned digests, the manifest stored beside the files."""
    request = source.request
    name = request.card.name if request.card else posixpath.basename(uri.rstrip("/")) or uri
    layout = request.layout or (request.card.default_layout if request.card else None)
    files: list[PlannedFile] = []
    user_manifest = request.options.get("manifest")
    if user_manifest:
        m = Manifest.load(Path(str(user_manifest)))
        files = [PlannedFile(path=f.path, size=f.size, sha256=f.sha256, anchor="manifest",
                             locator=locate(f.path)) for f in m.files]
        name, layout = (request.card.name if request.card else m.name), m.layout or layout
    elif request.card is not None and _pinned(source):
        card_files = request.card.layout(layout).files or ()
        files = [PlannedFile(path=f.path, size=f.size, sha256=f.sha256, anchor="catalog",
                             locator=locate(f.path)) for f in card_files]
    else:
        raw = read_remote_manifest()
        if raw is None:
            raise NoTrustAnchorError(
                f"{uri}: no manifest to take digests from (looked for {REMOTE_MANIFEST})",
                hint="pass --manifest FILE, or upload the model with `weightship push` so its "
                     "manifest travels with it")
        try:
            m = Manifest.from_dict(json.loads(raw), origin=f"{uri}/{REMOTE_MANIFEST}")
        except ValueError as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{uri}/{REMOTE_MANIFEST}: not valid JSON ({e})") from None
        files = [PlannedFile(path=f.path, size=f.size, sha256=f.sha256, anchor="remote-manifest",
                             locator=locate(f.path)) for f in m.files]
        if request.card is None:
            name, layout = m.name, m.layout or layout
    return FetchPlan(name=name, layout=layout, files=files,
                     source=SourceInfo(kind=source.kind, uri=uri, revision=revision))


def _pinned(source: Source) -> bool:
    card = source.request.card
    assert card is not None
    files = card.layout(source.request.layout).files
    return bool(files) and all(f.sha256 and f.size is not None for f in files or ())
