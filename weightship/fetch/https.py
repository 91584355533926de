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

import httpx

from weightship.errors import RemoteNotFoundError, UsageError
from weightship.fetch.base import FetchPlan, PlannedFile
from weightship.fetch.download import RangeReader
from weightship.fetch.http import HttpRemote, make_client, raise_for_status
from weightship.fetch.ranged import REMOTE_MANIFEST, RangedSource, plan_from_manifest


class HttpsSource(RangedSource):
    """Fetches a model directory from a web server by ranged GETs."""

    kind: ClassVar[str] = "https"
    schemes: ClassVar[tuple[str, ...]] = ("https", "http")
    _client: httpx.Client | None = None

    @property
    def base(self) -> str:
        """The directory URL, ending in ``/``."""
        url = str(self.spec.get("url") or (self.request.ref if self.request.card is None else ""))
        if not url.startswith(("https://", "http://")):
            raise UsageError(f"https source needs an http(s):// URL, got {url!r}")
        return url if url.endswith("/") else url + "/"

    @property
    def client(self) -> httpx.Client:
        """The pooled client all of this source's downloads share."""
        if self._client is None:
            self._client = make_client(self.transfer_options())
        return self._client

    def _url(self, path: str) -> str:
        return self.base + quote(path)

    def _remote_manifest(self) -> bytes | None:
        url = self._url(REMOTE_MANIFEST)
        try:
            r = self.client.get(url, follow_redirects=True)
        except httpx.HTTPError as e:
            raise RemoteNotFoundError(f"{url}: {type(e).__name__}: {e}") from None
        if r.status_code == 404:
            return None
        raise_for_status(r, url)
        return r.content

    def plan(self) -> FetchPlan:
        return plan_from_manifest(self, uri=self.base, revision=None,
                                  read_remote_manifest=self._remote_manifest, locate=self._url)

    def remote(self, file: PlannedFile) -> RangeReader:
        return HttpRemote(self.client, self._url(file.path))

    def uri_for(self, file: PlannedFile) -> str:
        return self._url(file.path)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
