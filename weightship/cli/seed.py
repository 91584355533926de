"""``weightship seed``: serve a verified model directory to peers (BitTorrent, or the fleet swarm)."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from weightship.cli._common import JsonOption, progress_for, stdout, wants_json


class Protocol(str, enum.Enum):
    """What the peers speak."""

    auto = "auto"
    bittorrent = "bittorrent"
    swarm = "swarm"


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
    upload_limit: Annotated[int, typer.Option(help="Bytes per second, 0 = unlimited (BitTorrent).")] = 0,
    protocol: Annotated[Protocol, typer.Option(help="bittorrent, or swarm (what `fetch --peer` speaks "
                                               "for Hub, S3 and web-server models); auto: swarm for a "
                                               "directory fetched from one of those, else bittorrent.")]
    = Protocol.auto,
    chunk_mib: Annotated[int, typer.Option("--chunk-mib", min=1, help="Swarm chunk size in MiB: the fetches' "
                                           "--chunk-mib.")] = 4,
    json_flag: JsonOption = False,
) -> None:
    """Seed DIRECTORY: print how peers reach it, then serve them.

    Examples:

    \b
      weightship seed ./tiny --listen 0.0.0.0:6881 --for 1h
      weightship seed ./tiny --announce-to http://tracker.lan:6969/announce --json
      weightship seed /models/mistral --protocol swarm --peers-from-dns peers.ml.svc
    """
    from weightship.torrent.peers import PeerSource, parse_duration

    duration = parse_duration(for_)
    as_json = wants_json(json_flag)
    if _protocol(directory, torrent, protocol) is Protocol.swarm:
        _seed_swarm(directory, listen, tuple(peer or ()), peers_from_dns, duration, chunk_mib << 20, as_json)
        return
    from weightship.torrent.seed import Seeding, seed_directory

    def ready(info: Seeding) -> None:
        _ready(info.to_dict(), [f"seeding {directory} ({info.files} files) on {', '.join(info.listen)}",
                                info.magnet], as_json)

    with progress_for(json_flag) as progress:
        uploaded = seed_directory(
            directory, torrent=torrent.read_bytes() if torrent else None, listen=listen,
            duration=duration, announce=list(announce_to or ()), upload_limit=upload_limit,
            peers=PeerSource.from_options(tuple(peer or ()), peers_from_dns),
            progress=progress, on_ready=ready)
    _done(uploaded, as_json)


def _protocol(directory: Path, torrent: Path | None, asked: Protocol) -> Protocol:
    if asked is not Protocol.auto:
        return asked
    from weightship.manifest import Manifest
    from weightship.paths import STATE_DIR
    from weightship.torrent.seed import KEPT_TORRENT

    if torrent is not None or (directory / STATE_DIR / KEPT_TORRENT).is_file():
        return Protocol.bittorrent
    source = Manifest.load(directory).source
    return Protocol.swarm if source is not None and source.kind in ("hf", "s3", "https") else Protocol.bittorrent


def _seed_swarm(directory: Path, listen: str, peers: tuple[str, ...], dns: str | None, duration: float,
                chunk: int, as_json: bool) -> None:
    from weightship.swarm.seed import SwarmSeeding, seed_swarm

    def ready(info: SwarmSeeding) -> None:
        _ready(info.to_dict(), [f"serving {directory} ({info.files} files) to swarm peers on {info.listen}"],
               as_json)

    uploaded = seed_swarm(directory, listen=listen.split(",")[0], peers=peers, peers_from_dns=dns,
                          duration=duration, chunk_size=chunk, on_ready=ready)
    _done(uploaded, as_json)


def _ready(event: dict[str, object], lines: list[str], as_json: bool) -> None:
    """Say that seeding has started (how peers reach it), at once: scripts wait for this line."""
    if as_json:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    else:
        for line in lines:
            stdout.print(line, highlight=False, markup=False)
        stdout.file.flush()


def _done(uploaded: int, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"event": "done", "uploaded": uploaded}) + "\n")
    else:
        stdout.print(f"done: {uploaded:,} bytes uploaded", highlight=False)
