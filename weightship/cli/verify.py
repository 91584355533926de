"""``weightship verify``: check a model directory against its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from weightship.catalog import load_card
from weightship.cli._common import JsonOption, emit, progress_for
from weightship.errors import UsageError
from weightship.manifest import Manifest
from weightship.verify import verify_dir


def verify(
    directory: Annotated[Path, typer.Argument(help="Model directory.")],
    deep: Annotated[bool, typer.Option("--deep", help="Also validate safetensors headers, "
                                       "tensor names and shapes, and scan for NaN/Inf.")] = False,
    manifest: Annotated[Path | None, typer.Option(help="Check against this manifest file "
                                                  "instead of the directory's own.")] = None,
    model: Annotated[str | None, typer.Option(help="Check against a catalog card's pinned "
                                              "digests.")] = None,
    json_flag: JsonOption = False,
) -> None:
    """Check every file's sha256 (files hashed in parallel); exit 3 naming each bad file.

    Examples:

    \b
      weightship verify ./tiny
      weightship verify ./tiny --deep --json
      weightship verify ./tiny --model weightship-tiny
    """
    if manifest and model:
        raise UsageError("give --manifest or --model, not both")
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    with progress_for(json_flag) as progress:
        report = verify_dir(directory, manifest=Manifest.load(manifest) if manifest else None,
                            card=load_card(model) if model else None, deep_check=deep,
                            progress=progress)

    def human(console: Console) -> None:
        if report.ok:
            total = sum(f.size or 0 for f in report.files)
            console.print(f"[green]✓[/] {report.name}: {len(report.files)} files, {total:,} bytes "
                          f"verified{' (deep)' if deep else ''}", highlight=False)
        else:
            table = Table("file", "problem", "detail", title=f"{report.name}: verification failed")
            for p in report.problems:
                table.add_row(p.path, p.status, p.detail)
            console.print(table)
        for note in report.notes:
            console.print(f"note: {note}", markup=False, highlight=False)

    emit(report.to_dict(), human, json_flag=json_flag)
    report.raise_for_problems()
