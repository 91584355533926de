"""``weightship manifest``: write, show or sign a model directory's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from weightship.cli._common import JsonOption, emit, progress_for
from weightship.errors import UsageError
from weightship.manifest import Manifest, create_for_directory, manifest_path

app = typer.Typer(help="Write, show or sign a model directory's manifest.", no_args_is_help=True)


def _render(m: Manifest, console: Console) -> None:
    table = Table("path", "size", "sha256", "anchor",
                  title=f"{m.name} ({m.layout or 'unknown layout'}), verified {m.verified_at or 'never'}")
    for f in m.files:
        table.add_row(f.path, f"{f.size:,}", f.sha256, f.anchor or "")
    console.print(table)
    if m.source:
        console.print(f"source: {m.source.kind} {m.source.uri or ''} "
                      f"{m.source.revision or ''}".rstrip(), markup=False, highlight=False)


@app.command("create")
def create(
    directory: Annotated[Path, typer.Argument(help="A local model directory.")],
    name: Annotated[str | None, typer.Option(help="Model name [default: the directory's].")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing manifest.")] = False,
    json_flag: JsonOption = False,
) -> None:
    """Hash every file of DIRECTORY into DIRECTORY/.weightship/manifest.json.

    Example: weightship manifest create ./my-finetune --name acme-7b-support
    """
    if manifest_path(directory).exists() and not force:
        raise UsageError(f"{manifest_path(directory)} exists",
                         hint="pass --force to replace it with digests of the files as they are now")
    with progress_for(json_flag) as progress:
        m = create_for_directory(directory, name=name, progress=progress)
    path = m.write(directory)
    def human(console: Console) -> None:
        _render(m, console)
        console.print(f"wrote {path}", highlight=False)

    emit(m.to_dict(), human, json_flag=json_flag)


@app.command("show")
def show(directory: Annotated[Path, typer.Argument(help="Model directory or manifest file.")],
         json_flag: JsonOption = False) -> None:
    """Show a model directory's manifest. Example: weightship manifest show ./tiny"""
    m = Manifest.load(directory)
    emit(m.to_dict(), lambda c: _render(m, c), json_flag=json_flag)


@app.command("sign")
def sign(
    directory: Annotated[Path, typer.Argument(help="A model directory with a manifest.")],
    key: Annotated[Path, typer.Option("--key", help="Private key (PEM, elliptic curve).")],
    json_flag: JsonOption = False,
) -> None:
    """Sign DIRECTORY's manifest (OpenSSF model signing, key-based, offline).

    The signature goes to DIRECTORY/.weightship/manifest.sig, beside the manifest it signs; it
    covers the manifest's bytes, and so every file's size and sha256. Whoever fetches the
    directory (s3://, https://) with --trust-key KEY.pub checks it before using any digest.
    The model_signing CLI verifies the same pair. Rewriting the manifest (a fetch, convert)
    removes the signature: sign again afterwards.

    \b
    Examples:
      weightship manifest keygen acme.pem            # acme.pem and acme.pem.pub
      weightship manifest sign ./acme-7b --key acme.pem
    """
    from weightship.signing import sign_directory

    path = sign_directory(directory, key)
    emit({"directory": str(directory), "signature": str(path)},
         lambda c: c.print(f"[green]✓[/] signed {manifest_path(directory)} → {path}", highlight=False),
         json_flag=json_flag)


@app.command("keygen")
def keygen(
    key: Annotated[Path, typer.Argument(help="Where to write the private key; the public key goes "
                                        "beside it, with .pub appended.")],
    json_flag: JsonOption = False,
) -> None:
    """Make an elliptic-curve (P-256) key pair for signing manifests.

    Example: weightship manifest keygen ~/.config/weightship/acme.pem
    """
    from weightship.signing import generate_key

    if key.exists():
        raise UsageError(f"{key} exists; refusing to overwrite a key")
    public = generate_key(key)
    emit({"private_key": str(key), "public_key": str(public)},
         lambda c: c.print(f"wrote {key} (keep it secret) and {public} (give it to those who fetch)",
                           highlight=False), json_flag=json_flag)
