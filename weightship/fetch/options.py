"""How a fetch runs: typed options, built once (by the CLI, or by a caller of
:func:`weightship.fetch.fetch`) and read as attributes all the way down.

:class:`FetchOptions` holds what every source may use (the Hub revision, a manifest to enforce,
trusted keys) and three groups: :class:`TransferOptions` (ranged reads: Hub, S3, HTTPS),
:class:`PeerOptions` (the fleet a fetch shares bytes with: the swarm of a ranged source, or a
torrent's peers) and :class:`TorrentOptions`. Each setting has one default, here; a value that
makes no sense is a :class:`~weightship.errors.UsageError` (exit 2) when the options are made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from weightship.errors import UsageError

SWARM_CHUNK = 4 << 20  # the chunk size of a fetch with peers, unless --chunk-mib says otherwise
MIN_SPLIT = 4 << 20  # no file is cut finer than this to give each connection a share (TransferOptions.split)
MAX_CONNECTIONS = 16  # how far a large file's connections may grow unless --connections is given


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise UsageError(what)


@dataclass(frozen=True)
class TransferOptions:
    """How hard to pull. The defaults start with 8 ranged reads in flight in 192 MiB of buffers:
    enough for a 2-core laptop and for a link a few connections fill (on loopback here, 1 GiB/s).
    On a fast link to a far server, where each connection is held back by latency, a large
    file's connections grow by themselves up to ``max_connections`` (a fetch's default: 16, each a
    thread and a ``chunk_size`` buffer: 288 MiB per file at most), or ``connections`` sets them."""

    connections: int = 4  # ranged reads in flight per file; more hides per-connection latency
    parallel_files: int = 2  # files downloaded at once; total connections = product of both
    chunk_size: int = 16 << 20  # bytes per ranged read; also the resume granularity
    stall_timeout: float = 30.0  # seconds without a byte before reconnecting
    retries: int = 6  # tries per chunk without progress, for retryable errors only
    backoff: float = 0.5  # first retry delay in seconds, doubled each time (with jitter)
    backoff_max: float = 15.0
    verify: bool = True  # hash while downloading; off only for benchmarks (never promoted)
    # Write chunks with O_DIRECT where the filesystem allows: no page-cache copy (on a 2-core VM
    # here, 1 GiB fetched and fsynced took 1.25 s instead of 1.9 s), and a fresh model does not
    # push other files out of the cache. The price: it is not in the cache afterwards either.
    direct_io: bool = True
    # Requests in flight for the whole fetch, shared by its files (a small file's GET holds one,
    # a large file's ranged reads up to ``connections``); 0: connections x parallel_files.
    requests: int = 0
    # Cut a file smaller than ``connections`` chunks into about one chunk per connection
    # (:meth:`chunk_for`). Off where the chunk size is the user's (``--chunk-mib``) or a swarm's
    # (every node of a fleet must cut a file alike).
    split: bool = True
    # A large file's connections double from ``connections`` up to this many while each doubling
    # raises the rate its bytes arrive at by a quarter (ChunkedDownload): a link whose flows are
    # held back by their round trips fills, one that is not (loopback, a busy CPU) stays as it
    # was. 0: fixed. Fixed where the user gives --connections, and in a swarm.
    max_connections: int = 0

    def __post_init__(self) -> None:
        _require(self.connections >= 1, f"connections must be 1 or more, not {self.connections}")
        _require(self.parallel_files >= 1, f"parallel files must be 1 or more, not {self.parallel_files}")
        _require(self.chunk_size >= 4096, f"the chunk size must be 4096 bytes or more, not {self.chunk_size}")
        _require(self.requests >= 0, f"requests must be 0 (automatic) or more, not {self.requests}")
        _require(self.max_connections >= 0, f"max connections must not be negative, not {self.max_connections}")
        _require(self.stall_timeout > 0, f"the stall timeout must be positive, not {self.stall_timeout}")
        _require(self.retries >= 0 and self.backoff >= 0 and self.backoff_max >= 0,
                 "retries and backoff must not be negative")

    def chunk_for(self, size: int) -> int:
        """The chunk size for a file of ``size`` bytes: ``chunk_size``, or, for a file that many
        chunks would leave connections idle (``split``), its share of the connections, in whole
        MiB of at least :data:`MIN_SPLIT`. Where each connection is held back by its round trips
        (a far server, a CDN), a 20 MiB file then comes over 4 connections instead of 2 (16 + 4
        MiB): measured through a relay that caps each connection's answers at 200 Mbit/s, see
        bench/fetch.py's ``--flow-mbps``. A file of many chunks keeps ``chunk_size``."""
        if not self.split or size >= self.connections * self.chunk_size or self.chunk_size <= MIN_SPLIT:
            return self.chunk_size
        share = -(-size // self.connections)  # ceil
        return min(self.chunk_size, max(MIN_SPLIT, -(-share // (1 << 20)) << 20))


@dataclass(frozen=True)
class PeerOptions:
    """The fleet a fetch shares bytes with: for a ranged source the swarm
    (:mod:`weightship.swarm`), for a torrent its BitTorrent peers and listen port."""

    listen: str | None = None  # ADDR:PORT to serve peers on (a torrent: libtorrent's syntax)
    peers: tuple[str, ...] = ()  # HOST:PORT of the same fetch on other nodes
    peers_from_dns: str | None = None  # NAME[:PORT] whose A/AAAA records are peers
    seed_for: float = 0.0  # seconds to serve after the fetch; inf: until stopped
    # seconds to wait, before a file's first chunk, for the peers to answer and share the file
    # (with --peers-from-dns, for the name to resolve to one): the chunks then fall to the
    # members from the start, and a node that only takes (no --listen) finds the ones fetching
    wait: float = 2.0
    stall: float = 10.0  # seconds without news from a peer (or a byte of a chunk) before giving up on it

    def __post_init__(self) -> None:
        from weightship.torrent.peers import parse_endpoint

        for p in self.peers:
            parse_endpoint(p)  # a malformed one fails here, before anything starts
        _require(self.seed_for >= 0, f"seed time must not be negative, not {self.seed_for}")
        _require(self.wait >= 0 and self.stall > 0, "peer wait must not be negative, peer stall positive")

    @property
    def wanted(self) -> bool:
        """Whether the fetch joins a fleet at all (a listen address or peers are named)."""
        return bool(self.listen or self.peers or self.peers_from_dns)


@dataclass(frozen=True)
class TorrentOptions:
    """A torrent source's own settings. Its stall timeout is longer than an HTTP read's: a swarm
    may need minutes to find a peer with the next piece, where a server answers or is down."""

    trackers: tuple[str, ...] = ()  # extra tracker URLs
    metadata_timeout: float = 120.0  # seconds to get a magnet link's metadata from peers
    stall_timeout: float = 300.0  # seconds without a byte from any peer before giving up
    resume_every: float = 2.0  # seconds between saves of libtorrent's resume data

    def __post_init__(self) -> None:
        _require(self.metadata_timeout > 0 and self.stall_timeout > 0 and self.resume_every > 0,
                 "torrent timeouts must be positive")


@dataclass(frozen=True)
class FetchOptions:
    """Everything about how to fetch, beside what to fetch (:class:`~weightship.fetch.base.FetchRequest`)."""

    revision: str | None = None  # Hub branch, tag or commit; None: the card's pin, else main
    manifest: Path | None = None  # a manifest whose digests to enforce (the user vouches for it)
    trust_keys: tuple[Path, ...] = ()  # public keys trusted to sign a source's manifest
    transfer: TransferOptions = field(default_factory=TransferOptions)
    peers: PeerOptions = field(default_factory=PeerOptions)
    torrent: TorrentOptions = field(default_factory=TorrentOptions)


def build_options(*, revision: str | None = None, manifest: Path | None = None,
                  trust_keys: Sequence[Path] = (), connections: int | None = None,
                  parallel_files: int | None = None, requests: int | None = None,
                  chunk_size: int | None = None, stall_timeout: float | None = None,
                  direct_io: bool | None = None, listen: str | None = None,
                  peers: Sequence[str] = (), peers_from_dns: str | None = None,
                  peer_wait: float | None = None, trackers: Sequence[str] = (),
                  seed_for: str | None = None) -> FetchOptions:
    """:class:`FetchOptions` from the command line's flags (None: the default).

    Two defaults depend on others: a fetch with peers reads :data:`SWARM_CHUNK` chunks (a chunk
    is passed on only once it is whole, so smaller chunks reach the other nodes sooner: on 4
    shaped nodes, 4 MiB chunks finished in 0.75x the time of 16), and ``--stall-timeout``, when
    given, is also the torrent's.
    """
    from weightship.torrent.peers import parse_duration

    fleet = PeerOptions(listen=listen, peers=tuple(peers), peers_from_dns=peers_from_dns,
                        seed_for=parse_duration(seed_for) if seed_for else 0.0,
                        wait=PeerOptions.wait if peer_wait is None else peer_wait)
    split = chunk_size is None and not fleet.wanted  # the user's chunk size or a swarm's is kept
    if chunk_size is None and fleet.wanted:
        chunk_size = SWARM_CHUNK
    d = TransferOptions
    transfer = TransferOptions(
        connections=d.connections if connections is None else connections,
        parallel_files=d.parallel_files if parallel_files is None else parallel_files,
        requests=d.requests if requests is None else requests,
        chunk_size=d.chunk_size if chunk_size is None else chunk_size,
        stall_timeout=d.stall_timeout if stall_timeout is None else stall_timeout,
        direct_io=d.direct_io if direct_io is None else direct_io, split=split,
        max_connections=MAX_CONNECTIONS if connections is None and not fleet.wanted else 0)
    torrent = TorrentOptions(trackers=tuple(trackers), stall_timeout=TorrentOptions.stall_timeout
                             if stall_timeout is None else stall_timeout)
    return FetchOptions(revision=revision, manifest=manifest, trust_keys=tuple(trust_keys),
                        transfer=transfer, peers=fleet, torrent=torrent)
