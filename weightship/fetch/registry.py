"""The fetch-source registry, keyed by source kind and by URI scheme.

Sources live one per module and are imported only when used, so ``weightship fetch`` of the tiny
model never imports boto3 or libtorrent. Adding a source is one line in ``_SOURCES``.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from weightship.errors import UnknownSourceError
from weightship.fetch.base import Source

# kind -> "module:Class"
_SOURCES: dict[str, str] = {
    "builtin": "weightship.fetch.builtin:BuiltinSource",
    "hf": "weightship.fetch.hf:HfSource",
    "s3": "weightship.fetch.s3:S3Source",
    "https": "weightship.fetch.https:HttpsSource",
    "torrent": "weightship.fetch.torrent:TorrentSource",
    "pypi": "weightship.fetch.pypi:PypiSource",
}


def known_kinds() -> list[str]:
    """The kinds of source this weightship knows."""
    return sorted(_SOURCES)


def source_class(kind: str) -> type[Source]:
    """The :class:`Source` subclass registered for ``kind``."""
    try:
        target = _SOURCES[kind]
    except KeyError:
        raise UnknownSourceError(
            f"no source of kind {kind!r}", hint="known kinds: " + ", ".join(known_kinds())
        ) from None
    module, _, name = target.partition(":")
    cls: type[Source] = getattr(importlib.import_module(module), name)
    return cls


def kind_for_uri(uri: str) -> str:
    """The kind of source that handles ``uri``, from its scheme."""
    if uri.endswith(".torrent") and "://" not in uri:
        return "torrent"  # a local .torrent file has no scheme
    scheme = urlsplit(uri).scheme.lower()
    for kind in _SOURCES:
        if scheme and scheme in source_class(kind).schemes:
            return kind
    raise UnknownSourceError(
        f"no source handles {uri!r}",
        hint="give a catalog name (`weightship models`) or a URI: "
             + ", ".join(f"{s}://" for k in _SOURCES for s in source_class(k).schemes),
    )
