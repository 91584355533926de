"""The ``weightship`` command: wires the command groups, one module each."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from weightship import __version__
from weightship.cli import (
    _common,
    convert,
    deploy,
    fetch,
    instance,
    manifest,
    mirror,
    models,
    nodes,
    push,
    seed,
    serve,
    torrent,
    verify,
)

app = typer.Typer(
    name="weightship",
    help="Move open-weight models from where they are published to where they run, "
         "verifying every byte.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"weightship {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    json_output: Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _common.configure(json_output=json_output, quiet=quiet, verbose=verbose)


app.add_typer(models.app, name="models")
app.command("fetch")(fetch.fetch)
app.command("verify")(verify.verify)
app.add_typer(manifest.app, name="manifest")
app.command("convert")(convert.convert)
app.command("mirror")(mirror.mirror)
app.command("push")(push.push)
app.command("seed")(seed.seed)
app.add_typer(torrent.app, name="torrent")
app.command("serve")(serve.serve)
app.add_typer(deploy.app, name="deploy")
app.add_typer(nodes.app, name="nodes")
app.add_typer(instance.app, name="instance")


def main() -> None:
    """Entry point of the ``weightship`` script."""
    sys.exit(_common.run(app))
