"""``weightship seed``: serve a verified model directory to BitTorrent peers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from weightship.cli._common import JsonOption, progress_for, stdout, wants_json


def seed(
    directory: Annotated[Path, typer.Argument(help="A verified model directory.")],
    torrent: Annotated[Path | None, typer.Option(help="The .torrent to seed [default: the one "
                                                 "kept by a torrent fetch, else a new one].")] = None,
    listen: Annotated[str, typer.Option(help="HOST:PORT to accept peers on (libtorrent "
                                        "listen_interfaces, comma-separated).")] = "0.0.0.0:6881",
    announce_to: Annotated[list[str] | None, typer.Option(help="Tracker announce URL "
                                                          "(repeatable).")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="Also connect to this HOST:PORT "
                                                   "(repeatable).")] = None,
    peers_from_dns: Annotated[str | None, typer.Option(help="Connect to every A/AAAA record of "
                                                       "NAME[:PORT], re-resolved.")] = None,
    for_: Annotated[str, typer.Option("--for", help="How long: 90, 30s, 10m, 2h, forever.")] = "forever",
    upload_limit: Annotated[int, typer.Option(help="Bytes per second, 0 = unlimited.")] = 0,
    json_flag: JsonOption = False,
) -> None:
    """Seed DIRECTORY: print its magnet link and listening address, then serve peers.

    Examples:

    \b
      weightship seed ./tiny --listen 0.0.0.0:6881 --for 1h
      weightship seed ./tiny --announce-to http://tracker.lan:6969/announce --json
    """
    from weightship.torrent.peers import PeerSource, parse_duration
    from weightship.torrent.seed import Seeding, seed_directory

    duration = parse_duration(for_)
    as_json = wants_json(json_flag)

    def ready(info: Seeding) -> None:
        if as_json:
            sys.stdout.write(json.dumps(info.to_dict()) + "\n")
            sys.stdout.flush()
        else:
            stdout.print(f"seeding {directory} ({info.files} files) on {', '.join(info.listen)}",
                         highlight=False, markup=False)
            stdout.print(info.magnet, highlight=False, markup=False)
            stdout.file.flush()

    with progress_for(json_flag) as progress:
        uploaded = seed_directory(
            directory, torrent=torrent.read_bytes() if torrent else None, listen=listen,
            duration=duration, announce=list(announce_to or ()), upload_limit=upload_limit,
            peers=PeerSource.from_options(tuple(peer or ()), peers_from_dns),
            progress=progress, on_ready=ready)
    if as_json:
        sys.stdout.write(json.dumps({"event": "done", "uploaded": uploaded}) + "\n")
    else:
        stdout.print(f"done: {uploaded:,} bytes uploaded", highlight=False)
