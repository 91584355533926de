"""``weightship torrent``: make torrents of verified model directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from weightship.cli._common import JsonOption, emit
from weightship.manifest import atomic_write

app = typer.Typer(help="Make torrents of verified model directories.", no_args_is_help=True)


@app.command("create")
def create(
    directory: Annotated[Path, typer.Argument(help="A model directory with a manifest.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the .torrent "
                                             "[default: NAME.torrent here].")] = None,
    tracker: Annotated[list[str] | None, typer.Option(help="Announce URL (repeatable; one tier each).")] = None,
    webseed: Annotated[list[str] | None, typer.Option(help="HTTP(S) mirror of the files, BEP 19 "
                                                      "(repeatable).")] = None,
    piece_size: Annotated[int | None, typer.Option(help="Piece size in bytes, a power of two "
                                                   "[default: from the total size].")] = None,
    v1_only: Annotated[bool, typer.Option("--v1-only", help="A v1 torrent, for clients without "
                                          "BitTorrent v2 (aria2 1.36, transmission 3.00).")] = False,
    name: Annotated[str | None, typer.Option(help="Torrent name [default: the manifest's].")] = None,
    private: Annotated[bool, typer.Option(help="Mark private (no DHT/PEX; trackers only).")] = False,
    json_flag: JsonOption = False,
) -> None:
    """Make a v1+v2 hybrid torrent of the files DIRECTORY's manifest lists, with their sha256.

    Examples:

    \b
      weightship torrent create ./tiny --tracker http://tracker.lan:6969/announce
      weightship torrent create ./tiny --v1-only --webseed https://mirror.lan/models/ -o tiny.torrent
    """
    from weightship.torrent.create import create_torrent

    created = create_torrent(directory, trackers=tracker or (), webseeds=webseed or (),
                             piece_size=piece_size, v1_only=v1_only, name=name, private=private)
    target = out or Path(f"{created.meta.name}.torrent")
    atomic_write(target, created.data)
    info = created.meta.info
    result = {"torrent": str(target), "infohash": created.meta.infohash,
              "infohash_v2": str(info.info_hashes().v2) if info.info_hashes().has_v2() else None,
              "magnet": created.magnet, "pieces": info.num_pieces(), "piece_size": info.piece_length(),
              "files": len(created.meta.files), "bytes": sum(f.size for f in created.meta.files)}

    def human(console: Console) -> None:
        console.print(f"[green]✓[/] {target}: {result['files']} files, {result['bytes']:,} bytes, "
                      f"{result['pieces']} pieces of {result['piece_size']:,} bytes", highlight=False)
        console.print(created.magnet, markup=False, highlight=False)

    emit(result, human, json_flag=json_flag)
