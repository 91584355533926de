"""The ``weightship`` command: wires the command groups, one module each.

Each command's module is imported only when that command runs (or its own ``--help`` is
asked): ``weightship --version`` and ``weightship --help`` import none of them, and ``weightship
fetch`` never imports the serving stack, Helm or asyncssh. The table below is what ``--help``
lists; tests/cli/test_startup.py checks that it matches the commands themselves.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from weightship import __version__

# name: (module, attribute: a function or a Typer app, what `weightship --help` says of it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fetch": ("weightship.cli.fetch", "fetch", "Fetch a model and check every file against its trusted digest."),
    "verify": ("weightship.cli.verify", "verify", "Check every file of a model directory against its manifest."),
    "convert": ("weightship.cli.convert", "convert", "Convert weights to safetensors, safely."),
    "mirror": ("weightship.cli.mirror", "mirror", "Serve model directories read-only over the Hub's protocol."),
    "push": ("weightship.cli.push", "push", "Verify a model directory, then upload it with its manifest."),
    "seed": ("weightship.cli.seed", "seed", "Serve a verified model directory to peers."),
    "serve": ("weightship.cli.serve", "serve", "Serve a model over an OpenAI-compatible HTTP API."),
    "models": ("weightship.cli.models", "app", "List the model catalog, or show one model's card."),
    "manifest": ("weightship.cli.manifest", "app", "Write, show or sign a model directory's manifest."),
    "torrent": ("weightship.cli.torrent", "app", "Make torrents of verified model directories."),
    "deploy": ("weightship.cli.deploy", "app", "Deploy models on Kubernetes or on your own servers."),
    "nodes": ("weightship.cli.nodes", "app", "On-prem nodes over SSH: trust, status, rollback, uninstall, logs."),
    "instance": ("weightship.cli.instance", "app", "Dedicated instances for companies: endpoints, keys, usage."),
}


def load_command(name: str) -> Any:
    """The click command of ``name``, its module imported now: built as the root's own
    ``add_typer``/``command`` would build it (the root's markup and completion settings)."""
    module, attribute, _ = COMMANDS[name]
    obj = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    holder.callback()(lambda: None)  # a group, so that the command is not made the root
    if isinstance(obj, typer.Typer):
        holder.add_typer(obj, name=name)
    else:
        holder.command(name)(obj)
    return typer.main.get_command(holder).commands[name]  # type: ignore[attr-defined]


class LazyGroup(TyperGroup):
    """A group whose commands are imported when they are looked up, listed from :data:`COMMANDS`."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in self.commands:
            self.commands[cmd_name] = load_command(cmd_name)
        return self.commands[cmd_name]

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in COMMANDS.items()])


app = typer.Typer(
    name="weightship",
    cls=LazyGroup,
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
    from weightship.cli import _common

    _common.configure(json_output=json_output, quiet=quiet, verbose=verbose)


def main() -> None:
    """Entry point of the ``weightship`` script."""
    from weightship.cli import _common

    sys.exit(_common.run(app))
