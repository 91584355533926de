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

**The Hub's listing** (:func:`hold_hub_listing`, called by the hf source's plan). A card binds an
explicit ``hf://org/name[@rev]`` fetch too when one of its hf sources names the same repository
and pins the very commit the Hub resolved (the card's sizes and sha256s; files the card does not
list are kept, with the listing's digests). What the card does not pin by sha256 takes its digest
from the listing of the endpoint ``HF_ENDPOINT`` names. The public Hub (``https://huggingface.co``,
the default) is that anchor (``hf-lfs``/``hf-git``). Any other endpoint (a mirror, a proxy) vouches
only as far as it is trusted, like a manifest its own server sent unsigned: over plain ``http://``
it is refused for a catalog card's fetch (:class:`~weightship.errors.UnsignedListingError`)
unless every file fetched is pinned by the card's sha256; otherwise it is taken with a warning
that names the endpoint as the anchor, and its files are recorded with anchor
``unsigned-hub-listing``, which ``convert`` never trusts enough to unpickle a file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from weightship.errors import DigestMismatchError, FetchError, UnsignedListingError
from weightship.fetch.base import FetchRequest, PlannedFile
from weightship.fetch.select import wanted_by
from weightship.manifest import UNSIGNED_LISTING, FileEntry

if TYPE_CHECKING:
    from weightship.catalog import Card, CardFile

log = logging.getLogger(__name__)


def card_pins(request: FetchRequest, layout: str | None) -> dict[str, CardFile]:
    """The files the request's card lists for ``layout`` (the plan's), by path; empty without a
    card or a file list."""
    card = request.card
    if card is None:
        return {}
    name = layout if layout in card.layouts else request.layout
    return {f.path: f for f in card.layout(name).files or ()}


def bind(files: list[PlannedFile], pins: dict[str, CardFile], where: str, *,
         keep_unlisted: bool = False) -> list[PlannedFile]:
    """``files`` held to the card's ``pins`` (step 1 of the module docstring); ``where`` names
    the source in errors. Files the card does not list are left out, or kept as they are with
    ``keep_unlisted`` (an explicit ``hf://`` fetch that a card binds)."""
    if not pins:
        return files
    bound = []
    for f in files:
        pin = pins.get(f.path)
        if pin is None:
            if keep_unlisted:
                bound.append(f)
            else:
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


def card_for_hub(repo: str, commit: str) -> tuple[Card, str] | None:
    """The catalog card (and layout) with an hf source for ``repo`` pinned at ``commit``: the
    card that binds an explicit ``hf://`` fetch of that repository at that commit. Hub repository
    names are compared without case, as the Hub resolves them."""
    from weightship.catalog import list_cards

    for card in list_cards():
        for s in card.sources:
            if s.get("kind") == "hf" and str(s.get("repo", "")).lower() == repo.lower() \
                    and card.hub_revision(s) == commit:
                return card, str(s.get("layout") or card.default_layout)
    return None


def hold_hub_listing(request: FetchRequest, files: list[PlannedFile], *, repo: str, commit: str,
                     endpoint: str, public: bool, layout: str | None,
                     default_optional: tuple[str, ...] = ()) -> list[PlannedFile]:
    """The Hub's listing of ``repo`` at ``commit`` held to what binds it (the module docstring's
    last paragraph): a card's pins, and the trust a non-public ``endpoint`` earns."""
    where = "the hf source" if public else f"the Hub listing at {endpoint}"
    wanted = wanted_by(request, default_optional)
    pinned: dict[str, CardFile] = {}
    bound = request.card is not None
    if request.card is not None:
        pinned = card_pins(request, layout)
        # what the engine will fetch (it binds these again): a contradiction is said first
        fetched = bind([f for f in files if wanted(f.path)], pinned, where)
    else:
        found = card_for_hub(repo, commit)
        if found is not None:
            bound, (card, card_layout) = True, found
            pinned = {f.path: f for f in card.layout(card_layout).files or ()}
            files = bind(files, pinned, where, keep_unlisted=True)
            log.info("hf://%s@%s: held to the catalog card %s's pins", repo, commit, card.name)
        fetched = [f for f in files if wanted(f.path)]
    if public:
        return files

    def is_pinned(path: str) -> bool:
        return path in pinned and pinned[path].sha256 is not None

    unpinned = sorted(f.path for f in fetched if not is_pinned(f.path))
    if not unpinned:
        return files
    names = ", ".join(unpinned[:4]) + (" …" if len(unpinned) > 4 else "")
    plain = endpoint.startswith("http://")
    if plain and bound:
        raise UnsignedListingError(
            f"{endpoint}: refusing the Hub listing of {repo} over plain HTTP as the trust anchor "
            f"for {names} (the catalog card pins no sha256 for them): whoever can change the "
            "files on the way can change the listing too",
            hint="serve the mirror over https (it is then the anchor, with a warning), unset "
                 "HF_ENDPOINT to use the public Hub, or --include only files the card pins")
    log.warning("%s: no trust anchor for %s but the file listing %s sent (not the public "
                "Hub%s): it vouches only as far as that endpoint is trusted (recorded as anchor "
                "%r)", repo, names, endpoint, ", over plain HTTP" if plain else "", UNSIGNED_LISTING)
    return [f if is_pinned(f.path) else dataclasses.replace(f, anchor=UNSIGNED_LISTING)
            for f in files]
