"""What a catalog card pins binds every source.

A card lists, per layout, the model's files with the sizes and sha256 digests someone published
(DESIGN.md: "What a card pins binds every source"). Whichever source made the plan (the Hub's
listing at a commit, a manifest, a torrent's info dict, a generator), the engine holds it to the
card twice:

1. **At plan time, before a byte is written.** A planned file the card pins must have the card's
   size, and the card's sha256 where the source also gives one; a mismatch is a
   :class:`~weightship.errors.DigestMismatchError` (exit 3) naming what the source claimed. A
   file whose sha256 only the card knows takes it (anchor ``catalog``), so every source is then
   checked against the card's digest. Files the card does not list are not part of the model
   and are left out; a file the card lists that the source lacks fails the fetch
   (:func:`check_complete`, once ``--include``/``--exclude`` have chosen the files).
2. **Before promotion.** Every checked file's size and sha256 are compared with the pins again
   (:func:`check_entries`): the digests the engine enforces came from the plan, and this keeps a
   path that skipped a step (a file already present, a bulk download) from promoting anything
   the card contradicts.

A card whose layout lists no files (``files: null``) pins nothing here; its source's anchor alone
decides (the Hub's LFS sha256 at the commit the card pins).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

from weightship.catalog import CardFile
from weightship.errors import DigestMismatchError, FetchError
from weightship.fetch.base import FetchRequest, PlannedFile
from weightship.manifest import FileEntry

log = logging.getLogger(__name__)


def card_pins(request: FetchRequest, layout: str | None) -> dict[str, CardFile]:
    """The files the request's card lists for ``layout`` (the plan's), by path; empty without a
    card or a file list."""
    card = request.card
    if card is None:
        return {}
    name = layout if layout in card.layouts else request.layout
    return {f.path: f for f in card.layout(name).files or ()}


def bind(files: list[PlannedFile], pins: dict[str, CardFile], where: str) -> list[PlannedFile]:
    """``files`` held to the card's ``pins`` (step 1 of the module docstring); ``where`` names
    the source in errors."""
    if not pins:
        return files
    bound = []
    for f in files:
        pin = pins.get(f.path)
        if pin is None:
            log.info("%s: %s is not in the card; left out", where, f.path)
            continue
        if pin.size is not None and f.size is not None and f.size != pin.size:
            raise DigestMismatchError(f.path, expected=f"{pin.size} bytes (the catalog card)",
                                      actual=f"{f.size} bytes as {where} lists it", what="size")
        if pin.sha256 is not None and f.sha256 is not None and f.sha256 != pin.sha256:
            raise DigestMismatchError(f.path, expected=f"{pin.sha256} (the catalog card)",
                                      actual=f"{f.sha256} as {where} lists it")
        if pin.sha256 is not None:
            f = dataclasses.replace(f, sha256=pin.sha256, anchor="catalog")
        if f.size is None and pin.size is not None:
            f = dataclasses.replace(f, size=pin.size)
        bound.append(f)
    return bound


def check_complete(files: list[PlannedFile], pins: dict[str, CardFile],
                   wanted: Callable[[str], bool], where: str) -> None:
    """Fail when a file the card lists, and the request wants, is not in the plan."""
    have = {f.path for f in files}
    missing = sorted(p for p in pins if p not in have and wanted(p))
    if missing:
        raise FetchError(f"{where} does not offer {', '.join(missing[:5])}"
                         + (" …" if len(missing) > 5 else "") + ", which the catalog card lists",
                         hint="the source holds another version of the model; try another --source")


def check_entries(entries: Iterable[FileEntry], pins: dict[str, CardFile]) -> None:
    """Step 2 of the module docstring: every checked file against the card, before promotion."""
    for e in entries:
        pin = pins.get(e.path)
        if pin is None:
            continue
        if pin.size is not None and e.size != pin.size:
            raise DigestMismatchError(e.path, expected=f"{pin.size} bytes (the catalog card)",
                                      actual=f"{e.size} bytes", what="size")
        if pin.sha256 is not None and e.sha256 != pin.sha256:
            raise DigestMismatchError(e.path, expected=f"{pin.sha256} (the catalog card)",
                                      actual=e.sha256)
