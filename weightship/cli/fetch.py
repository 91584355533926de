"""``weightship fetch``: download a model into a directory, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from weightship.cli._common import JsonOption, emit, progress_for
from weightship.fetch import build_request
from weightship.fetch import fetch as run_fetch
from weightship.fetch.engine import default_dir_name
from weightship.fetch.options import build_options
from weightship.settings import get_settings


# Long only by its options, which typer reads from the signature; the body parses and calls the library.
def fetch(
    model: Annotated[str, typer.Argument(help="Catalog name (see `weightship models`) or URI.")],
    to: Annotated[Path | None, typer.Option("--to", help="Destination directory "
                                            "[default: $WEIGHTSHIP_HOME/models/NAME].")] = None,
    layout: Annotated[str | None, typer.Option(help="hf or original [default: the card's].")] = None,
    source: Annotated[str, typer.Option(help="auto, or source kinds in order, e.g. hf,s3.")] = "auto",
    include: Annotated[list[str] | None, typer.Option(help="Only files matching this glob.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Skip files matching this glob.")] = None,
    wait_lock: Annotated[float, typer.Option(help="Seconds to wait for another fetch into "
                                             "the same directory.")] = 0.0,
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit [default: main, "
                                                 "or the card's pin].")] = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", help="Manifest whose digests to "
                                                  "enforce (s3://, https:// sources).")] = None,
    trust_key: Annotated[list[Path] | None, typer.Option(
        "--trust-key", envvar="WEIGHTSHIP_TRUST_KEY", help="Public key (PEM) trusted to sign the "
        "manifest an s3:// or https:// source holds; checked before any digest is used "
        "(repeatable; the variable takes paths separated by spaces).")] = None,
    connections: Annotated[int | None, typer.Option(min=1, help="Ranged reads in flight per "
                                                    "file [default: 4, doubling up to 16 while that "
                                                    "makes a large file come faster].")] = None,
    parallel_files: Annotated[int | None, typer.Option(min=1, help="Files downloaded at once "
                                                       "[default: 2].")] = None,
    requests: Annotated[int | None, typer.Option(min=1, help="Requests in flight for the whole "
                                                 "fetch, shared by its files (a small file takes "
                                                 "one, a large one up to --connections) "
                                                 "[default: connections x parallel-files].")] = None,
    chunk_mib: Annotated[int | None, typer.Option("--chunk-mib", min=1, help="MiB per ranged "
                                                  "read; also what a resume may repeat [default: 16].")] = None,
    stall_timeout: Annotated[float | None, typer.Option(help="Seconds without a byte before "
                                                        "reconnecting [default: 30; a torrent: 300].")] = None,
    direct_io: Annotated[bool | None, typer.Option("--direct-io/--no-direct-io", help="Write with "
                                                   "O_DIRECT, bypassing the page cache, where the "
                                                   "filesystem allows [default: on].")] = None,
    listen: Annotated[str | None, typer.Option(help="Serve peers on ADDR:PORT while fetching (the "
                                               "fleet swarm; a torrent's BitTorrent port).")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="A peer HOST:PORT of the same fetch on "
                                                   "another node (repeatable): its bytes are taken "
                                                   "first, the origin's only where no peer has them.")] = None,
    peers_from_dns: Annotated[str | None, typer.Option(help="Peers: every A/AAAA record of "
                                                       "NAME[:PORT], re-resolved while fetching.")] = None,
    peer_wait: Annotated[float | None, typer.Option(min=0, help="Seconds to wait for the peers to "
                                                    "answer before taking a file's chunks from the "
                                                    "origin [default: 2].")] = None,
    tracker: Annotated[list[str] | None, typer.Option(help="Extra BitTorrent tracker URL "
                                                      "(repeatable).")] = None,
    seed_for: Annotated[str | None, typer.Option(help="After the fetch, serve peers for up to this "
                                                 "long (30s, 10m, 2h, forever); a swarm fetch stops "
                                                 "sooner once every peer has verified the model.")] = None,
    json_flag: JsonOption = False,
) -> None:
    """Fetch a model, check every file against its trusted digest, and promote it atomically.

    Examples:

    \b
      weightship fetch weightship-tiny --to ./tiny
      weightship fetch weightship-tiny --layout original --to ./tiny-orig
      weightship fetch mistral-7b-v0.1 --source hf          # at the card's pinned commit
      weightship fetch s3://models/acme-7b --trust-key acme.pub
      weightship fetch mistral-7b-v0.1 --to /models/m --listen 0.0.0.0:6881 \\
          --peer 10.0.0.12:6881 --peer 10.0.0.13:6881 --seed-for 10m
    """
    options = build_options(
        revision=revision, manifest=manifest, trust_keys=trust_key or (), connections=connections,
        parallel_files=parallel_files, requests=requests, chunk_size=chunk_mib << 20 if chunk_mib else None,
        stall_timeout=stall_timeout, direct_io=direct_io, listen=listen, peers=peer or (),
        peers_from_dns=peers_from_dns, peer_wait=peer_wait, trackers=tracker or (), seed_for=seed_for)
    request = build_request(model, layout=layout, include=include or (), exclude=exclude or (),
                            options=options)
    dest = to or get_settings().model_dir(default_dir_name(request))
    with progress_for(json_flag) as progress:
        result = run_fetch(request, dest, source=source, progress=progress, lock_wait=wait_lock)
    m = result.manifest

    def human(console: Console) -> None:
        console.print(f"[green]✓[/] {m.name} → {result.directory}: {len(m.files)} files, "
                      f"{m.total_bytes:,} bytes verified ({len(result.fetched)} fetched, "
                      f"{len(result.skipped)} already present)", highlight=False)
        if result.peer_bytes or result.uploaded_bytes or result.banned_peers:
            console.print(f"  {result.origin_bytes:,} bytes from the origin, {result.peer_bytes:,} "
                          f"from {len(result.from_peers)} peers, {result.uploaded_bytes:,} sent to "
                          "peers", highlight=False)
        for peer, why in result.banned_peers.items():
            console.print(f"  [yellow]banned peer {peer}[/]: {why}", highlight=False)

    emit({"directory": str(result.directory), "name": m.name, "fetched": result.fetched,
          "skipped": result.skipped, "downloaded_bytes": result.downloaded_bytes,
          "resumed_bytes": result.resumed_bytes, "origin_bytes": result.origin_bytes,
          "peer_bytes": result.peer_bytes, "uploaded_bytes": result.uploaded_bytes,
          "files_traffic": result.traffic, "from_peers": result.from_peers,
          "banned_peers": result.banned_peers, "manifest": m.to_dict()}, human, json_flag=json_flag)
