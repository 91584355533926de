"""The ``https`` source: a plain web server or CDN holding a model directory and its manifest.

``https://host/models/mistral/`` must serve the model's files under that prefix and
``.weightship/manifest.json`` beside them (what ``weightship fetch`` leaves in a directory, so
any static file server over a fetched directory works). The digests come from ``--manifest
FILE``, the catalog card, or that manifest when it is signed (``.weightship/manifest.sig``) with
a key the user trusts; see :mod:`weightship.fetch.ranged` for the order. An unsigned manifest
from the same server is refused over plain ``http://`` and taken, with a warning, over https.
"""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import quote

from weightship.errors import UsageError
from weightship.fetch.base import FetchPlan, PlannedFile
from weightship.fetch.ranged import RangedSource, plan_from_manifest
from weightship.fetch.remote import RangeReader
from weightship.fetch.transport import HttpRemote, get_small


class HttpsSource(RangedSource):
    """Fetches a model directory from a web server by ranged GETs."""

    kind: ClassVar[str] = "https"

    @property
    def base(self) -> str:
        """The directory URL, ending in ``/``."""
        url = str(self.spec.get("url") or (self.request.ref if self.request.card is None else ""))
        if not url.startswith(("https://", "http://")):
            raise UsageError(f"https source needs an http(s):// URL, got {url!r}")
        return url if url.endswith("/") else url + "/"

    def _url(self, path: str) -> str:
        return self.base + quote(path)

    def _read_small(self, rel: str) -> bytes | None:
        return get_small(self.pool, self._url(rel))

    def plan(self) -> FetchPlan:
        return plan_from_manifest(self, uri=self.base, revision=None, read_remote=self._read_small,
                                  locate=self._url, secure=self.base.startswith("https://"))

    def remote(self, file: PlannedFile) -> RangeReader:
        return HttpRemote(self.pool, self._url(file.path))

    def uri_for(self, file: PlannedFile) -> str:
        return self._url(file.path)
