"""``weightship convert``: original-layout ``.pth`` → safetensors, or a GGUF → a model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightship.cli._common import JsonOption, emit
from weightship.errors import UsageError
from weightship.manifest import Manifest


def convert(
    source: Annotated[Path, typer.Argument(help="Model directory in the original layout, or a .gguf file.",
                                           metavar="DIR|FILE.gguf")],
    to: Annotated[str, typer.Option("--to", help="safetensors (for a directory), or the directory to "
                                    "write (for a GGUF).")] = "safetensors",
    dtype: Annotated[str, typer.Option(help="For a GGUF: the dtype of the weights written: bfloat16, "
                                       "float16 or float32.")] = "bfloat16",
    name: Annotated[str | None, typer.Option(help="For a GGUF: the model's name in the manifest "
                                             "(default: the file's stem).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Trust this manifest's digest for the "
                                                  ".pth instead of the directory's own.")] = None,
    json_flag: JsonOption = False,
) -> None:
    """Convert weights to safetensors, safely.

    A directory: consolidated.00.pth becomes consolidated.safetensors, after checking its digest
    (unpickled only if its sha256 matches the trusted manifest, and then only with
    torch.load(weights_only=True)).

    A GGUF file (llama.cpp's format; Llama architecture, byte-level BPE tokenizer): its header and
    every tensor's place are checked against the file before anything is read; the tensors are
    dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1) into model.safetensors, with config.json,
    tokenizer.json and tokenizer_config.json (the chat template kept), and a manifest naming the
    GGUF's sha256. The same GGUF gives the same bytes.

    Examples:

    \b
      weightship convert ./mistral-7b-orig --to safetensors
      weightship convert SmolLM2-135M-Instruct.Q4_1.gguf --to ./smollm2
      weightship convert model.gguf --to ./model --dtype float32 --json
    """
    if source.is_file() and source.suffix.lower() == ".gguf":
        _convert_gguf(source, Path(to), dtype, name, json_flag)
        return
    if source.suffix.lower() == ".gguf":
        raise UsageError(f"{source} is not a file")
    if to != "safetensors":
        raise UsageError(f"unknown target format {to!r} (only safetensors)",
                         hint="to convert a GGUF, give the .gguf file and --to DIR")
    from weightship.verify.convert import convert_directory

    entry = convert_directory(source, manifest=Manifest.load(manifest) if manifest else None)
    emit({"directory": str(source), "file": entry.path, "size": entry.size,
          "sha256": entry.sha256}, lambda c: c.print(
        f"[green]✓[/] {source}/{entry.path}: {entry.size:,} bytes, sha256 {entry.sha256}",
        highlight=False), json_flag=json_flag)


def _convert_gguf(gguf: Path, out: Path, dtype: str, name: str | None, json_flag: bool) -> None:
    from weightship.verify.gguf_convert import convert_gguf

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory", hint="give a new directory with --to")
    result = convert_gguf(gguf, out, dtype=dtype, name=name)
    assert result.source is not None
    emit({"directory": str(out), "name": result.name, "source_sha256": result.source.revision,
          "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in result.files]},
         lambda c: c.print("\n".join(f"[green]✓[/] {out}/{f.path}: {f.size:,} bytes, sha256 {f.sha256}"
                                     for f in result.files), highlight=False), json_flag=json_flag)
