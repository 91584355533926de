"""Verifying model directories: digests against the manifest, and deep checks of the weights."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightship.errors import (
    CatalogError,
    MalformedWeightsError,
    ManifestError,
    UnsafePathError,
    VerificationFailed,
)
from weightship.manifest import FileEntry, Manifest, utcnow
from weightship.paths import STATE_DIR, PathsUnder
from weightship.progress import NullProgress, Progress
from weightship.verify import deep
from weightship.verify.digests import hash_files
from weightship.verify.safetensors import SafetensorsHeader, read_header

if TYPE_CHECKING:
    from weightship.catalog import Card

log = logging.getLogger(__name__)


@dataclass
class FileCheck:
    """The outcome for one file: ``status`` is "ok" or what is wrong."""

    path: str
    status: str  # ok | missing | size | sha256 | unreadable | unexpected | unsafe | malformed | …
    detail: str = ""
    size: int | None = None
    sha256: str | None = None
    expected_sha256: str | None = None


@dataclass
class VerifyReport:
    """Everything ``verify`` found."""

    directory: Path
    name: str
    deep: bool
    files: list[FileCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[FileCheck]:
        """The checks that failed."""
        return [f for f in self.files if f.status != "ok"]

    @property
    def ok(self) -> bool:
        """Whether every file matched and every deep check passed."""
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise :class:`VerificationFailed` (exit 3) if anything failed."""
        if not self.ok:
            raise VerificationFailed([(p.path, f"{p.status}: {p.detail}") for p in self.problems])

    def to_dict(self) -> dict[str, Any]:
        """The report as ``verify --json`` prints it."""
        return {"directory": str(self.directory), "name": self.name, "ok": self.ok,
                "deep": self.deep, "files": [asdict(f) for f in self.files], "notes": self.notes}


def manifest_from_card(card: Card, directory: Path) -> Manifest:
    """A manifest built from a card's pinned digests, for the layout ``directory`` holds."""
    layout = card.layout(deep.detect_layout(directory))
    entries = []
    for f in layout.default_files():
        if f.sha256 is None or f.size is None:
            raise ManifestError(
                f"{card.name}: the card pins no sha256 for {f.path}",
                hint="verify against the manifest written when the model was fetched "
                     "(drop --model)")
        entries.append(FileEntry(path=f.path, size=f.size, sha256=f.sha256, anchor="catalog"))
    return Manifest(name=card.name, files=entries, layout=layout.name)


def _unexpected_files(directory: Path, manifest: Manifest) -> list[FileCheck]:
    listed = {f.path for f in manifest.files}
    out: list[FileCheck] = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in sorted(files) + [d for d in dirs if (Path(root) / d).is_symlink()]:
            rel = (rel_root / name).as_posix()
            if rel not in listed:
                out.append(FileCheck(rel, "unexpected", "not in the manifest"))
    return out


def verify_dir(directory: Path, *, manifest: Manifest | None = None, deep_check: bool = False,
               card: Card | None = None, workers: int | None = None,
               progress: Progress | None = None, record: bool = True) -> VerifyReport:
    """Check every file of ``directory`` against ``manifest`` (default: the directory's own).

    With ``deep_check``, also validate every safetensors header, the tensors' names and shapes
    against the architecture (the directory's config, else ``card``'s), and scan for NaN/Inf.
    When the directory's own manifest was used and everything passed, its ``verified_at`` is
    updated (best effort: a read-only directory is fine).
    """
    progress = progress or NullProgress()
    own = manifest is None
    if manifest is None:
        manifest = manifest_from_card(card, directory) if card else Manifest.load(directory)
    report = VerifyReport(directory=directory, name=manifest.name, deep=deep_check)

    targets: dict[str, Path] = {}
    under = PathsUnder(directory)
    for entry in manifest.files:
        try:
            path = under.resolve(entry.path)
        except UnsafePathError as e:
            report.files.append(FileCheck(entry.path, "unsafe", e.reason))
            continue
        if not path.is_file():
            report.files.append(FileCheck(entry.path, "missing", "no such file"))
            continue
        targets[entry.path] = path

    progress.begin("verify", files=len(targets),
                   total_bytes=sum(e.size for e in manifest.files if e.path in targets))
    digests = hash_files(targets.items(), workers=workers, progress=progress)
    for entry in manifest.files:
        result = digests.get(entry.path)
        if result is None:
            continue
        if isinstance(result, OSError):
            report.files.append(FileCheck(entry.path, "unreadable", str(result.strerror)))
            continue
        size, sha = result
        if size != entry.size:
            status, detail = "size", f"expected {entry.size} bytes, found {size}"
        elif sha != entry.sha256:
            status, detail = "sha256", f"expected {entry.sha256[:16]}…, got {sha[:16]}…"
        else:
            status, detail = "ok", ""
        report.files.append(FileCheck(entry.path, status, detail, size, sha, entry.sha256))
    report.files += _unexpected_files(directory, manifest)
    if deep_check:
        _deep(report, directory, targets, card)
    report.files.sort(key=lambda f: f.path)
    progress.end()
    if own and record and card is None and report.ok:
        manifest.verified_at = utcnow()
        try:
            manifest.write(directory)
        except OSError as e:
            log.info("could not record verified_at in %s: %s", directory, e)
    return report


def _deep(report: VerifyReport, directory: Path, targets: dict[str, Path], card: Card | None) -> None:
    headers: list[SafetensorsHeader] = []
    labels: dict[Path, str] = {}
    weights = [(rel, p) for rel, p in targets.items() if rel.endswith(".safetensors")]
    for rel, path in weights:
        try:
            header = read_header(path, label=rel)
        except MalformedWeightsError as e:
            report.files.append(FileCheck(rel, "malformed", e.reason))
            continue
        headers.append(header)
        labels[path] = rel
        bad = deep.scan_nonfinite(header)
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            report.files.append(FileCheck(rel, "nonfinite", f"NaN or Inf in {', '.join(bad[:3])}{more}"))
    try:
        found = deep.directory_architecture(directory)
    except CatalogError as e:
        report.files.append(FileCheck("config", "architecture", str(e)))
        return
    if found is None and card is not None:
        layout = "hf" if any(h.path.name.startswith("model") for h in headers) else "original"
        found = (card.architecture, layout)
    if found is None:
        report.notes.append("no config.json or params.json: tensor names and shapes not checked")
    elif headers:
        for rel, reason in deep.check_architecture(headers, found[0], found[1], labels):
            report.files.append(FileCheck(rel, "architecture", reason))
        for rel, reason in deep.check_index(directory, headers, labels):
            report.files.append(FileCheck(rel, "index", reason))
    pickles = [rel for rel in targets if rel.endswith((".pth", ".bin", ".pt"))]
    if pickles:
        report.notes.append("pickle files are checked by digest only (never unpickled here): "
                            + ", ".join(sorted(pickles)) + "; `weightship convert` turns them into safetensors")
