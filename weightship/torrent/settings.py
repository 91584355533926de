"""libtorrent session settings, chosen for moving a few large files fast inside a data centre.

libtorrent's defaults are tuned for a desktop client on the public internet: many slow,
untrusted peers, uTP to be polite to home routers, small send buffers, eight upload slots and
tit-for-tat. Over loopback those defaults moved 512 MiB at 8.5 MB/s; with uTP off and larger
send buffers the same transfer ran at 252 MB/s (DESIGN.md). A weightship swarm is the opposite
case — a handful of fast peers that all want every byte — so the settings below say, one by
one, what changes and why. References: libtorrent's ``settings_pack`` reference and its
"tuning" guide (high-performance seeding section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libtorrent as lt

from weightship import __version__

# Metadata (an info dict) larger than this is refused, from a .torrent file or from peers.
# A 14.5 GB model with 16 MiB pieces needs ~18 KB of piece hashes; 8 MiB is generous.
MAX_METADATA_BYTES = 8 << 20

# block_progress: one alert per 16 KiB block received, naming the peer that sent it: how a fetch
# tells the bytes of the fleet's peers (--peer, --peers-from-dns) from the origin's, per file.
ALERTS = (lt.alert.category_t.error_notification | lt.alert.category_t.status_notification
          | lt.alert.category_t.storage_notification | lt.alert.category_t.peer_notification
          | lt.alert.category_t.tracker_notification | lt.alert.category_t.ip_block_notification
          | lt.alert.category_t.block_progress_notification)


@dataclass(frozen=True)
class SessionOptions:
    """What a user may change about a session; everything else is fixed below, with reasons."""

    listen: str = "0.0.0.0:6881,[::]:6881"  # listen_interfaces syntax: HOST:PORT[,HOST:PORT]
    dht: bool = False  # public DHT: off unless asked (a private cluster needs none)
    lsd: bool = False  # local service discovery (multicast on the LAN)
    upload_limit: int = 0  # bytes/s, 0 = unlimited
    download_limit: int = 0  # bytes/s, 0 = unlimited
    utp: bool = False  # uTP: polite on home links, a large slowdown on a LAN (see module docstring)


def settings_pack(opts: SessionOptions) -> dict[str, Any]:
    """The settings_pack dict for a weightship session."""
    return {
        "user_agent": f"weightship/{__version__} libtorrent/{lt.__version__}",
        "listen_interfaces": opts.listen,
        "alert_mask": ALERTS,
        # bursts of per-block alerts (~64k per GB) must not drop a ban alert between two polls
        "alert_queue_size": 200_000,
        # -- transports ------------------------------------------------------------------------
        # uTP's delay-based congestion control backs off at the first queueing delay and its
        # user-space packet handling costs CPU per 1.4 KB packet; TCP is the right transport on
        # a LAN. This single change is most of the 30x seen on loopback.
        "enable_outgoing_utp": opts.utp,
        "enable_incoming_utp": opts.utp,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        # -- discovery: nothing leaves the machine unless asked for --------------------------
        "enable_dht": opts.dht,
        "enable_lsd": opts.lsd,
        "enable_upnp": False,  # data-centre nodes have no home router to open ports on
        "enable_natpmp": False,
        # -- peers -----------------------------------------------------------------------------
        # Several peers may share an IP: pods behind one node's NAT, or test peers on loopback.
        "allow_multiple_connections_per_ip": True,
        "connections_limit": 400,  # a 50-node rollout plus headroom; the default is 200
        # A LAN peer that dropped is worth retrying soon, not after the default 60 s.
        "min_reconnect_time": 2,
        "peer_connect_timeout": 5,
        "max_failcount": 5,
        # -- choking: a private swarm cooperates ------------------------------------------------
        # Tit-for-tat protects a public swarm against free riders; here every node wants every
        # byte and all are ours, so unchoke everyone (-1) with a fixed-slots choker, and let a
        # seed serve the peers that can take data fastest.
        "choking_algorithm": int(lt.choking_algorithm_t.fixed_slots_choker),
        "unchoke_slots_limit": -1,
        "seed_choking_algorithm": int(lt.seed_choking_algorithm_t.fastest_upload),
        # -- request pipeline -------------------------------------------------------------------
        # At 1 GB/s and 16 KiB blocks, 3 s of queue is ~190k blocks; the default cap of 500
        # outstanding requests per peer starves a fast link, so raise it.
        "max_out_request_queue": 4000,
        "max_allowed_in_request_queue": 8000,  # the serving side must accept that many
        "request_queue_time": 3,
        # Download whole pieces from one peer when it is fast: fewer partially-finished
        # pieces, better disk locality and smart-ban can attribute a bad piece to one peer.
        "whole_pieces_threshold": 5,
        "piece_extent_affinity": True,
        # -- send buffers ----------------------------------------------------------------------
        # The default 500 KB watermark drains in under a millisecond at LAN rates, after which
        # the socket idles waiting for the disk. Keep ~16 MiB queued per peer, refill at 2 MiB.
        "send_buffer_watermark": 16 << 20,
        "send_buffer_low_watermark": 2 << 20,
        "send_buffer_watermark_factor": 150,  # % of the upload rate kept queued
        # -- disk ------------------------------------------------------------------------------
        # Two cores: a few I/O threads keep reads ahead of the sockets without thrashing; two
        # hashing threads check pieces while more arrive.
        "aio_threads": 4,
        "hashing_threads": 2,
        "max_queued_disk_bytes": 64 << 20,  # writes may back up this far before peers stall
        "file_pool_size": 64,
        # -- encryption: allowed (some clients insist) but never preferred: RC4 costs CPU and
        # protects nothing inside a cluster network.
        "prefer_rc4": False,
        # -- limits a user may set (0 = unlimited); local peers are not exempted on purpose: a
        # limit is usually there to protect a shared link inside the cluster.
        "upload_rate_limit": opts.upload_limit,
        "download_rate_limit": opts.download_limit,
        # -- hostile metadata -------------------------------------------------------------------
        "max_metadata_size": MAX_METADATA_BYTES,
        # -- queueing: a weightship session runs one or two torrents; never queue them.
        "active_downloads": -1,
        "active_seeds": -1,
        "active_limit": -1,
        "auto_manage_startup": 0,
    }


def open_session(opts: SessionOptions) -> lt.session:
    """A libtorrent session with :func:`settings_pack` (smart-ban, ut_metadata and ut_pex on)."""
    pack: Any = settings_pack(opts)  # the stubs want a settings_pack; the binding takes a dict
    params = lt.session_params(pack)
    return lt.session(params)
