"""The ``builtin`` source: models generated on this machine, such as ``weightship-tiny``.

The bytes are made locally by a deterministic generator and then checked, like any download,
against the sha256 the catalog card pins: a generator that drifted would fail the fetch.
"""

from __future__ import annotations

from typing import ClassVar

from weightship.catalog.tiny import tiny_files
from weightship.errors import CatalogError, UsageError
from weightship.fetch.base import FetchPlan, PlannedFile, Sink, Source
from weightship.manifest import SourceInfo

_CHUNK = 1 << 20


class BuiltinSource(Source):
    """Writes a built-in model's files from its generator."""

    kind: ClassVar[str] = "builtin"
    network: ClassVar[bool] = False  # generated here: not a downloaded byte
    _files: dict[str, bytes] | None = None

    def _layout(self) -> str:
        card = self.request.card
        if card is None:
            raise UsageError("the builtin source serves catalog models only, e.g. weightship-tiny")
        return self.request.layout or card.default_layout

    def plan(self) -> FetchPlan:
        card = self.request.card
        assert card is not None
        layout = card.layout(self._layout())
        if self.spec.get("generator") != "tiny":
            raise CatalogError(f"{card.name}: unknown builtin generator {self.spec.get('generator')!r}")
        files = []
        for f in layout.files or ():
            if f.sha256 is None or f.size is None:
                raise CatalogError(f"{card.name}: builtin file {f.path} has no pinned size and sha256")
            files.append(PlannedFile(path=f.path, size=f.size, sha256=f.sha256, anchor="catalog",
                                     locator=f"builtin://{card.name}/{f.path}"))
        seed = str(self.spec.get("seed"))
        return FetchPlan(name=card.name, layout=layout.name, files=files,
                         source=SourceInfo(kind="builtin", uri=f"builtin://{card.name}", revision=seed))

    def fetch_file(self, file: PlannedFile, sink: Sink) -> None:
        if self._files is None:
            card = self.request.card
            assert card is not None
            self._files = tiny_files(card.architecture, int(self.spec["seed"]), self._layout())
        data = memoryview(self._files[file.path])
        for start in range(0, len(data), _CHUNK):
            sink.write(data[start:start + _CHUNK])
