"""The ``https`` source: a plain web server or CDN holding a model directory and its manifest.

``https://host/models/mistral/`` must serve the model's files under that prefix and
``.weightship/manifest.json`` beside them (what ``weightship fetch`` leaves in a directory, so
any static file server over a fetched directory works). The digests come from that manifest, or
from ``--manifest FILE`` / the catalog card when given, which is the stronger anchor: a manifest
fetched from the same server vouches only as far as the server is trusted. ``http://`` is
accepted for servers on a trusted network (the digests still decide what is promoted).
"""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import quote

from weightship.errors import UsageError
from weightship.fetch.base import FetchPlan, PlannedFile
from weightship.fetch.download import RangeReader
from weightship.fetch.http import HttpRemote, get_small
from weightship.fetch.ranged import REMOTE_MANIFEST, RangedSource, plan_from_manifest


class HttpsSource(RangedSource):
    """Fetches a model directory from a web server by ranged GETs."""

    kind: ClassVar[str] = "https"
    schemes: ClassVar[tuple[str, ...]] = ("https", "http")

    @property
    def base(self) -> str:
        """The directory URL, ending in ``/``."""
        url = str(self.spec.get("url") or (self.request.ref if self.request.card is None else ""))
        if not url.startswith(("https://", "http://")):
            raise UsageError(f"https source needs an http(s):// URL, got {url!r}")
        return url if url.endswith("/") else url + "/"

    def _url(self, path: str) -> str:
        return self.base + quote(path)

    def _remote_manifest(self) -> bytes | None:
        return get_small(self.pool, self._url(REMOTE_MANIFEST))

    def plan(self) -> FetchPlan:
        return plan_from_manifest(self, uri=self.base, revision=None,
                                  read_remote_manifest=self._remote_manifest, locate=self._url)

    def remote(self, file: PlannedFile) -> RangeReader:
        return HttpRemote(self.pool, self._url(file.path))

    def uri_for(self, file: PlannedFile) -> str:
        return self._url(file.path)
