"""Which of a plan's files the user wants: ``--include`` / ``--exclude`` globs, and the optional
files (pickled duplicates, other frameworks' formats) only when an ``--include`` names them."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from weightship.errors import UnknownSourceError
from weightship.fetch.base import FetchRequest, PlannedFile

# Weights in formats other than safetensors are fetched only when asked for by --include
# (pickles are unsafe to load; the others are for other frameworks).
DEFAULT_OPTIONAL = ("*.bin", "*.bin.index.json", "*.pth", "*.pt", "*.pth.index.json", "*.h5",
                    "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.ckpt")


def wanted_by(request: FetchRequest, default_optional: Sequence[str] = ()) -> Callable[[str], bool]:
    """Whether the user wants a path: ``--include``/``--exclude`` globs, and optional files
    (the card's ``optional`` globs, else the source's, e.g. :data:`DEFAULT_OPTIONAL` for a Hub
    repo) only when an ``--include`` glob names them."""
    if request.card is not None:
        optional: Sequence[str] = request.card.layout(request.layout).optional
    else:
        optional = default_optional

    def match(path: str, globs: Sequence[str]) -> bool:
        return any(fnmatch.fnmatch(path, g) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], g)
                   for g in globs)

    def wanted(path: str) -> bool:
        if request.include and not match(path, request.include):
            return False
        if match(path, request.exclude):
            return False
        return not (match(path, optional) and not match(path, request.include))

    return wanted


def select_files(files: list[PlannedFile], request: FetchRequest,
                 default_optional: Sequence[str] = ()) -> list[PlannedFile]:
    """The planned files the user wants (see :func:`wanted_by`)."""
    wanted = wanted_by(request, default_optional)
    chosen = [f for f in files if wanted(f.path)]
    if files and not chosen:
        raise UnknownSourceError(f"no file of {request.ref} matches the --include/--exclude globs",
                                 hint="files: " + ", ".join(f.path for f in files[:20]))
    return chosen

