"""``weightship push``: upload a verified model directory, with its manifest, to S3."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from weightship.cli._common import JsonOption, emit, progress_for
from weightship.fetch.s3 import push_directory


def push(
    directory: Annotated[Path, typer.Argument(help="A fetched (or `manifest create`d) model directory.")],
    uri: Annotated[str, typer.Argument(help="Destination, s3://bucket/prefix.")],
    key: Annotated[Path | None, typer.Option("--key", help="Private key (PEM, elliptic curve) to "
                                             "sign the manifest with before uploading it.")] = None,
    json_flag: JsonOption = False,
) -> None:
    """Verify a model directory, then upload its files and its manifest to S3.

    With --key the manifest is signed first (OpenSSF model signing) and its signature,
    .weightship/manifest.sig, travels with it; a signature already there is uploaded too.
    Anyone holding the public key can then fetch it, verified against that manifest, with
    `weightship fetch s3://bucket/prefix --trust-key KEY.pub`. boto3's usual configuration
    applies (AWS_PROFILE, AWS_ENDPOINT_URL, AWS_REGION, the credential chain).

    Examples:

    \b
      weightship push ~/.cache/weightship/models/mistral-7b-v0.1 s3://models/mistral-7b-v0.1 --key acme.pem
      AWS_ENDPOINT_URL=http://minio:9000 weightship push ./tiny s3://models/tiny --key acme.pem
    """
    with progress_for(json_flag) as progress:
        m = push_directory(directory, uri, progress=progress, key=key)

    def human(console: Console) -> None:
        console.print(f"[green]✓[/] {m.name} → {uri}: {len(m.files)} files, {m.total_bytes:,} bytes "
                      "and the manifest", highlight=False)

    emit({"uri": uri, "name": m.name, "files": len(m.files), "bytes": m.total_bytes,
          "signed": key is not None}, human, json_flag=json_flag)
