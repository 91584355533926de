"""``weightship convert``: original-layout ``.pth`` → safetensors, safely."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightship.cli._common import JsonOption, emit
from weightship.errors import UsageError
from weightship.manifest import Manifest
from weightship.verify.convert import convert_directory


def convert(
    directory: Annotated[Path, typer.Argument(help="Model directory in the original layout.")],
    to: Annotated[str, typer.Option("--to", help="Target format.")] = "safetensors",
    manifest: Annotated[Path | None, typer.Option(help="Trust this manifest's digest for the "
                                                  ".pth instead of the directory's own.")] = None,
    json_flag: JsonOption = False,
) -> None:
    """Convert consolidated.00.pth to consolidated.safetensors after checking its digest.

    The .pth is unpickled only if its sha256 matches the trusted manifest, and then only with
    torch.load(weights_only=True). Example: weightship convert ./mistral-7b-orig --to safetensors
    """
    if to != "safetensors":
        raise UsageError(f"unknown target format {to!r} (only safetensors)")
    entry = convert_directory(directory, manifest=Manifest.load(manifest) if manifest else None)
    emit({"directory": str(directory), "file": entry.path, "size": entry.size,
          "sha256": entry.sha256}, lambda c: c.print(
        f"[green]✓[/] {directory}/{entry.path}: {entry.size:,} bytes, sha256 {entry.sha256}",
        highlight=False), json_flag=json_flag)
