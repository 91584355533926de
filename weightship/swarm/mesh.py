"""What this node knows of its peers: one reader of its events per peer, liveness, and bans.

Peers are ``--peer HOST:PORT`` endpoints and the A/AAAA records of ``--peers-from-dns NAME``
(re-resolved every few seconds, so nodes that start later are found). Each peer's event log is
read by a thread of its own as a stream (:mod:`weightship.swarm.protocol`: one connection, a
line per piece of news; long polls from a peer that does not stream); what it says is checked
field by field, and a peer whose log does not parse is treated as down. A peer that does not
answer is down until it answers again; a peer that restarted (a new epoch) is read
from the start. A banned peer (one caught sending bytes that are not what it said they were) is
never asked again by this process. Everything here is guarded by one lock, that of
:attr:`Mesh.cond`, which is notified on every change but news of a chunk; a chunk waiting for a
peer (:meth:`Mesh.wait_chunk`) wakes at once on news of that chunk, or on any other change. (On 8
nodes each node hears of some 1,800 events; each woke every waiting chunk to look at every peer.)
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from weightship import __version__
from weightship.swarm.protocol import EVENTS_PATH, MAX_REPLY, MAX_WAIT, Event, parse_event
from weightship.torrent.peers import PeerSource

log = logging.getLogger(__name__)

POLL_WAIT = 2.0  # seconds a long poll is held by the peer (between lines of a stream, at most)
CONNECT_TIMEOUT = 3.0
RETRY_EVERY = 0.5  # seconds between tries to reach a peer that is down
RESOLVE_EVERY = 5.0  # seconds between DNS lookups of --peers-from-dns


@dataclass
class RemoteFile:
    """One file as a peer described it."""

    size: int
    chunk: int
    have: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (provenance, digest)
    taken: dict[int, bool] = field(default_factory=dict)  # index -> from the origin
    done: bool = False


@dataclass
class Peer:
    """One peer endpoint and what it said."""

    host: str
    port: int
    node: str | None = None  # its id, once it answered
    epoch: str | None = None
    since: int = 0
    alive: bool = False
    last_event: float = 0.0  # when it last said something new (monotonic)
    news: float = 0.0  # when it last said something new or came up (monotonic)
    files: dict[str, RemoteFile] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # for parse_event
    inflight: int = 0  # our chunk requests to it now
    stopped: bool = False
    down_since: float | None = field(default_factory=time.monotonic)  # None while it answers

    @property
    def name(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.name}"


class Mesh:
    """The peers of one swarm node; see the module docstring."""

    def __init__(self, node: str, peers: PeerSource) -> None:
        self.node = node
        self.source = peers
        self._lock = threading.RLock()
        self.cond = threading.Condition(self._lock)
        self._chunk_waiters: dict[tuple[str, int], list[threading.Condition]] = {}
        self.peers: dict[tuple[str, int], Peer] = {}
        self.banned: dict[str, str] = {}  # node id or endpoint -> why
        self._closed = threading.Event()
        self._agent = f"weightship/{__version__}"
        self._threads: list[threading.Thread] = []

    def start(self) -> Mesh:
        """Start reading every known peer (and resolving the DNS name, if any)."""
        self._refresh()
        if self.source.dns_name:
            self._spawn(self._resolve_loop, "ws-peer-dns")
        return self

    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _refresh(self) -> None:
        found = set(self.source.endpoints())
        with self.cond:
            for endpoint in found - set(self.peers):
                peer = self.peers[endpoint] = Peer(*endpoint)
                self._spawn(self._poll_loop, f"ws-peer-{peer.name}", peer)
            for endpoint in set(self.peers) - found:  # a DNS record that went away
                self.peers[endpoint].stopped = True
                self.peers[endpoint].alive = False
            self._notify_all()

    def _resolve_loop(self) -> None:
        while not self._closed.wait(RESOLVE_EVERY):
            self._refresh()

    # ---- reading a peer -------------------------------------------------------------------------

    def _poll_loop(self, peer: Peer) -> None:
        while not self._closed.is_set() and not peer.stopped and not self.is_banned(peer):
            try:
                for reply in self._read(peer):
                    if not self._apply(peer, reply):
                        return  # it is this node itself
                    if self._closed.is_set() or peer.stopped or self.is_banned(peer):
                        return
            except (http.client.HTTPException, OSError, ValueError) as e:  # BadEvent too
                self._down(peer, e)
                self._closed.wait(RETRY_EVERY)

    def _read(self, peer: Peer) -> Iterator[dict[str, object]]:
        """The peer's replies from ``peer.since`` on: a stream of them, one per line, until the
        peer ends it (or one, from a peer that answers a long poll instead)."""
        conn = http.client.HTTPConnection(peer.host, peer.port, timeout=CONNECT_TIMEOUT)
        try:
            conn.request("GET", f"{EVENTS_PATH}?since={peer.since}&wait={POLL_WAIT}&epoch={peer.epoch or ''}"
                                f"&node={self.node}&stream=1", headers={"User-Agent": self._agent})
            assert conn.sock is not None
            conn.sock.settimeout(POLL_WAIT + MAX_WAIT)  # a line comes at least every POLL_WAIT seconds
            r = conn.getresponse()
            if r.status != 200:
                raise ValueError(f"HTTP {r.status}")
            while line := r.readline(MAX_REPLY + 1):
                if len(line) > MAX_REPLY:
                    raise ValueError("events reply too large")
                yield _reply(line)
        finally:
            conn.close()

    def _apply(self, peer: Peer, reply: dict[str, object]) -> bool:
        node, epoch = str(reply["node"]), str(reply["epoch"])
        if node == self.node:
            with self.cond:
                peer.stopped, peer.alive = True, False
                self._notify_all()
            return False
        with self.cond:
            changed = not peer.alive
            if peer.epoch != epoch or peer.node != node:
                changed = True
                # a first answer, or the peer restarted: the server answered from its log's start
                if peer.epoch is not None:
                    log.info("peer %s restarted; reading its news from the start", peer.name)
                peer.node, peer.epoch = node, epoch
                peer.files, peer.sizes = {}, {}
            events = reply["events"]
            assert isinstance(events, list)
            parsed = [parse_event(raw, peer.sizes) for raw in events]  # all or none
            chunks: set[tuple[str, int]] = set()
            for e in parsed:
                self._event(peer, e)
                if e.kind in ("have", "take"):
                    chunks.add((e.sha256, e.index))
                else:
                    changed = True
            nxt = reply["next"]
            assert isinstance(nxt, int)
            peer.since = nxt
            if parsed:
                peer.last_event = time.monotonic()
            if not peer.alive:
                log.info("peer %s (%s) is up", peer.name, node)
                peer.news = time.monotonic()
            peer.news = max(peer.news, peer.last_event)
            peer.alive, peer.down_since = True, None
            if changed:
                self._notify_all()
            else:
                for key in chunks:
                    for c in self._chunk_waiters.get(key, ()):
                        c.notify()
        return True

    @staticmethod
    def _event(peer: Peer, e: Event) -> None:
        if e.kind == "file":
            peer.files[e.sha256] = RemoteFile(e.size, e.chunk)
            return
        f = peer.files.get(e.sha256)
        if f is None:
            return
        if e.kind == "have":
            f.have[e.index] = (e.provenance, e.digest)
        elif e.kind == "take":
            f.taken[e.index] = e.origin
        elif e.kind == "drop":
            f.have.pop(e.index, None)
            f.taken.pop(e.index, None)
        elif e.kind == "done":
            f.done = True
        elif e.kind == "gone":
            del peer.files[e.sha256]

    def _down(self, peer: Peer, why: BaseException) -> None:
        with self.cond:
            if peer.alive:
                log.info("peer %s is down: %s", peer.name, why)
                peer.down_since = time.monotonic()
            peer.alive = False
            self._notify_all()

    def _notify_all(self) -> None:
        """Wake every waiter (call with :attr:`cond` held)."""
        self.cond.notify_all()
        for waiters in self._chunk_waiters.values():
            for c in waiters:
                c.notify()

    # ---- what the chunk scheduler asks ------------------------------------------------------------

    def wait_chunk(self, sha256: str, index: int, timeout: float) -> None:
        """Wait (with :attr:`cond` held) until a peer says something of chunk ``index`` of
        ``sha256``, or anything else changes (a peer comes or goes, shares or drops, is banned),
        or ``timeout`` seconds pass."""
        key = (sha256, index)
        c = threading.Condition(self._lock)
        self._chunk_waiters.setdefault(key, []).append(c)
        try:
            c.wait(timeout)
        finally:
            waiters = self._chunk_waiters[key]
            waiters.remove(c)
            if not waiters:
                del self._chunk_waiters[key]

    def wait_for_contact(self, timeout: float, sha256: str) -> None:
        """Wait until every known peer answered and shares the file ``sha256`` (or ``timeout``
        seconds; with a DNS name, until it names a peer at least): nodes started at about the
        same time then agree on who the members are, and split the origin's chunks from the
        first one."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while (not self.peers and self.source.dns_name) or not all(
                    (p.alive and sha256 in p.files) or p.stopped or self.is_banned(p) for p in self.peers.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)

    def usable(self) -> list[Peer]:
        """Peers that are up and not banned (call with :attr:`cond` held)."""
        return [p for p in self.peers.values()
                if p.alive and not p.stopped and p.node is not None and not self.is_banned(p)]

    def is_banned(self, peer: Peer) -> bool:
        return peer.name in self.banned or (peer.node is not None and peer.node in self.banned)

    def ban(self, peer: Peer, why: str) -> None:
        """Never ask ``peer`` (its endpoint and its node id) again."""
        with self.cond:
            if not self.is_banned(peer):
                log.warning("banned peer %s (%s): %s", peer.name, peer.node, why)
            self.banned[peer.name] = why
            if peer.node is not None:
                self.banned[peer.node] = why
            self._notify_all()

    def ban_node(self, node: str, why: str) -> None:
        """Ban the node ``node`` wherever it is reached."""
        with self.cond:
            for p in self.peers.values():
                if p.node == node:
                    self.ban(p, why)
            if node not in self.banned:
                log.warning("banned peer node %s: %s", node, why)
                self.banned[node] = why
            self._notify_all()

    def down(self, peer: Peer, why: BaseException) -> None:
        """A chunk request to ``peer`` failed at the connection: treat it as down until its
        events answer again."""
        self._down(peer, why)

    def nodes(self) -> set[str]:
        """The ids of the peers that answered and are not banned."""
        with self.cond:
            return {p.node for p in self.peers.values()
                    if p.node is not None and not p.stopped and not self.is_banned(p)}

    def not_done(self, digests: set[str], give_up: float = float("inf")) -> list[str]:
        """The known peers that have not said they verified every one of ``digests`` (one that
        said so and then went away counts as done: it finished, and left), leaving out those
        that have not answered for ``give_up`` seconds, and those that share none of
        ``digests`` and have said nothing new for ``give_up`` seconds (a peer serving another
        model: the seeders of the previous model while a chart's DaemonSet rolls to a new one)."""
        now = time.monotonic()
        with self.cond:
            peers = [p for p in self.peers.values() if not p.stopped and not self.is_banned(p)
                     and (p.down_since is None or now - p.down_since < give_up)
                     and (p.down_since is not None or any(d in p.files for d in digests)
                          or now - p.news < give_up)]
            return [p.name for p in peers if not all(d in p.files and p.files[d].done for d in digests)]

    def close(self) -> None:
        """Stop reading peers."""
        self._closed.set()
        with self.cond:
            self._notify_all()


def _reply(line: bytes) -> dict[str, object]:
    """One events reply, checked for its shape (its events are checked by :func:`parse_event`)."""
    reply = json.loads(line)
    if not isinstance(reply, dict) or not isinstance(reply.get("events"), list) \
            or not isinstance(reply.get("next"), int) or not isinstance(reply.get("node"), str) \
            or not isinstance(reply.get("epoch"), str):
        raise ValueError("not an events reply")
    return reply
