"""``weightship mirror``: serve verified model directories over the Hugging Face Hub protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightship.cli._common import stderr
from weightship.errors import UsageError
from weightship.mirror.repos import MirrorRoot
from weightship.mirror.server import Tls, read_tokens, serve_forever
from weightship.verify import verify_dir


def mirror(
    root: Annotated[Path, typer.Argument(help="Directory whose ORG/NAME subdirectories "
                                         "(fetched, with a manifest) are served as repos.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    token_file: Annotated[Path | None, typer.Option(help="File of accepted tokens, one a "
                                                    "line; clients send one as HF_TOKEN.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate "
                                                  "chain (PEM); needs --tls-key.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Private key (PEM) of --tls-cert.")] = None,
    verify: Annotated[bool, typer.Option(help="Re-hash every repo before serving.")] = False,
) -> None:
    """Serve the model directories under ROOT read-only to any Hugging Face Hub client.

    The directory ROOT/org/name is the repo org/name. Point clients at it with HF_ENDPOINT.

    Examples:

    \b
      weightship fetch mistral-7b-v0.1 --to /srv/hub/mistralai/Mistral-7B-v0.1
      weightship mirror /srv/hub --host 0.0.0.0 --port 8443 --token-file tokens.txt \\
          --tls-cert mirror.crt --tls-key mirror.key
      HF_ENDPOINT=https://mirror:8443 HF_TOKEN=… hf download mistralai/Mistral-7B-v0.1
    """
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = Tls(tls_cert, tls_key) if tls_cert and tls_key else None
    tokens = read_tokens(token_file)
    repos = MirrorRoot(root).repo_ids() if root.is_dir() else []
    if verify:
        for repo_id in repos:
            verify_dir(root / repo_id).raise_for_problems()
    stderr.print(f"serving {len(repos)} repo(s) from {root} on {'https' if tls else 'http'}://{host}:{port}"
                 + (" (token required)" if tokens else ""), markup=False, highlight=False)
    serve_forever(root, host=host, port=port, tokens=tokens, tls=tls)
