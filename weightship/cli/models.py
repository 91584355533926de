"""``weightship models``: the catalog."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from weightship.catalog import list_cards, load_card
from weightship.cli._common import JsonOption, emit

app = typer.Typer(help="List the model catalog, or show one model's card.", no_args_is_help=False)


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@app.callback(invoke_without_command=True)
def models(ctx: typer.Context, json_flag: JsonOption = False) -> None:
    """List the models in the catalog.

    Examples:

    \b
      weightship models
      weightship models --json | jq '.[].name'
    """
    if ctx.invoked_subcommand is not None:
        return
    cards = list_cards()

    def human(console: Console) -> None:
        table = Table("name", "parameters", "layouts (weights)", "sources", "license")
        for c in cards:
            layouts = ", ".join(f"{k} ({_size(v.weights_bytes())})" for k, v in c.layouts.items())
            table.add_row(c.name, f"{c.architecture.n_params / 1e9:.2f}B", layouts,
                          ", ".join(s["kind"] for s in c.sources), c.license)
        console.print(table)

    emit([c.summary() for c in cards], human, json_flag=json_flag)


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="Catalog name, e.g. mistral-7b-v0.1.")],
         json_flag: JsonOption = False) -> None:
    """Show one model's card: architecture, layouts, files, sources.

    Example: weightship models show mistral-7b-v0.1
    """
    card = load_card(name)
    emit(card.to_dict(), lambda console: console.print(
        yaml.safe_dump(card.to_dict(), sort_keys=False), markup=False, highlight=False),
        json_flag=json_flag)
