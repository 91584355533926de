"""What the user asked for, as a request, and the sources to try for it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from weightship.errors import UnknownSourceError, UnsafePathError
from weightship.fetch.base import FetchRequest, Source
from weightship.fetch.options import FetchOptions
from weightship.fetch.registry import kind_for_uri, source_class
from weightship.paths import safe_relpath


def make_sources(request: FetchRequest, source: str = "auto") -> list[Source]:
    """The sources to try for ``request``, in order.

    A catalog model uses its card's ``sources:`` list, filtered and ordered by ``source``
    ("auto" = all, in the card's order; "hf,s3" = those kinds, in that order). A URI uses the
    source registered for its scheme.
    """
    wanted = [s.strip() for s in source.split(",") if s.strip()] or ["auto"]
    if request.card is None:
        kind = kind_for_uri(request.ref)
        if wanted != ["auto"] and kind not in wanted:
            raise UnknownSourceError(f"{request.ref} is a {kind} URI, but --source is {source}")
        return [source_class(kind)(request)]
    specs = list(request.card.sources)
    if request.layout:
        specs = [s for s in specs if s.get("layout", request.layout) == request.layout]
    if wanted != ["auto"]:
        specs = sorted((s for s in specs if s["kind"] in wanted), key=lambda s: wanted.index(s["kind"]))
    if not specs:
        have = ", ".join(s["kind"] for s in request.card.sources)
        raise UnknownSourceError(
            f"{request.card.name} has no source matching --source {source}"
            + (f" and --layout {request.layout}" if request.layout else ""),
            hint=f"its sources: {have}")
    return [source_class(s["kind"])(request, s) for s in specs]


def build_request(ref: str, *, layout: str | None = None, include: Sequence[str] = (),
                  exclude: Sequence[str] = (), options: FetchOptions | None = None) -> FetchRequest:
    """A :class:`FetchRequest` for a catalog name or a URI (what looks like a URI is one: a fetch
    of a URI neither imports nor parses the catalog)."""
    card = None
    if not _looks_like_uri(ref):
        from weightship.catalog import load_card

        card = load_card(ref)
    if card is not None and layout is not None:
        card.layout(layout)  # fails early on a layout the card does not have
    return FetchRequest(ref=ref, card=card, layout=layout, include=tuple(include),
                        exclude=tuple(exclude), options=options or FetchOptions())


def default_dir_name(request: FetchRequest) -> str:
    """The directory name a fetch uses under ``$WEIGHTSHIP_HOME/models`` when no --to is given.

    A catalog model's name; else the URI's last meaningful part (a magnet's ``dn``, a repo or
    prefix name, a .torrent's stem). A name that would not be one safe path component (a hostile
    ``dn=../x``) falls back to a digest of the reference.
    """
    if request.card is not None:
        return request.card.name
    ref = request.ref
    if ref.startswith("magnet:"):
        query = parse_qs(urlsplit(ref).query)
        name = (query.get("dn") or query.get("xt") or [""])[0].rsplit(":", 1)[-1]
    elif ref.endswith(".torrent"):
        name = Path(ref).stem
    else:
        name = urlsplit(ref).path.rstrip("/").rsplit("/", 1)[-1].partition("@")[0]
    try:
        if name and "/" not in name:
            safe_relpath(name)
            return name
    except UnsafePathError:
        pass
    return "model-" + hashlib.sha256(ref.encode()).hexdigest()[:12]


def _looks_like_uri(ref: str) -> bool:
    return "://" in ref or ref.startswith("magnet:") or ref.endswith(".torrent")
