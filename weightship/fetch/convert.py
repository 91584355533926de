"""Converting on fetch: a card whose model is published as a GGUF is made ready to serve.

Called by the fetch engine with the directory's lock held, after the card's files were checked
and promoted and before the manifest is written. When the card has ``convert:`` and its GGUF is
among the fetched files, the GGUF is converted in place (:func:`~weightship.verify.gguf_convert.
convert_gguf`): ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
``tokenizer_config.json`` join the manifest with anchor ``convert`` and the GGUF's sha256 in their
source. Converting is deterministic, so a fetch run again writes the same bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from weightship.fetch.base import FetchRequest
from weightship.manifest import Manifest
from weightship.progress import Progress

log = logging.getLogger(__name__)


def convert_on_fetch(request: FetchRequest, dest: Path, manifest: Manifest, progress: Progress) -> None:
    """Convert the card's GGUF in ``dest`` and add the results to ``manifest`` (not written here)."""
    card = request.card
    if card is None or card.convert is None:
        return
    entry = manifest.entry(card.convert["from"])
    if entry is None:  # left out by --include/--exclude
        log.info("%s not fetched; nothing to convert", card.convert["from"])
        return
    from weightship.verify.gguf_convert import convert_gguf

    progress.note(f"converting {entry.path} to safetensors ({card.convert['dtype']})")
    convert_gguf(dest / entry.path, dest, dtype=card.convert["dtype"], manifest=manifest, source=entry.path)
