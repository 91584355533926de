"""BitTorrent for weightship, on libtorrent: session settings, metadata checks, torrent
creation, the download driver and the seeder. ``weightship.fetch.torrent`` plugs it into the
fetch engine; ``weightship.cli.seed`` / ``weightship.cli.torrent`` expose it.

libtorrent is imported only by these modules, so the rest of weightship never needs it.
"""
