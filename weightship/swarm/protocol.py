"""The peer protocol: two HTTP/1.1 GETs, and the checks applied to everything a peer says.

``GET /swarm/v2/events?since=N&wait=S&stream=1``
    The node's event log from entry ``N`` on, as JSON: ``{"v": 2, "node": ID, "epoch": E,
    "next": M, "events": [...]}``. When nothing is new the reply waits up to ``S`` seconds (a
    long poll), so news of a chunk reaches the peers within a round trip. ``epoch`` changes when
    the node restarts; a reader that sees a new epoch forgets what it knew and reads from 0.
    With ``stream=1`` the reply does not end: it is such an object per line (``application/
    x-ndjson``, the connection closed at its end), one as soon as there is news and an empty one
    after ``S`` seconds without, each going on from the previous one's ``next``. A reader of a
    server that answers with one object (no ``stream``) asks again from ``next``, as with a long
    poll. Measured here: a long poll per event cost its reader and server about 1.1 ms of CPU
    (urllib3, ``http.server``; a streamed line 0.06 ms), and on 8 nodes fetching 512 MiB the
    event readers took about 0.7 s of each node's CPU (0.16 s streamed).

``GET /swarm/v2/blob/SHA256`` with ``Range: bytes=A-B``
    Bytes of the file whose trusted sha256 is ``SHA256``, only within chunks the node has. There
    is no path anywhere in the protocol: a node serves only files it registered by digest (ones
    it is fetching or has verified against that digest), and never opens a file because a peer
    named it. A reply for exactly one chunk carries ``X-Weightship-Chunk: PROV DIGEST``, what
    the node vouches for in that very reply: bytes that do not hash to it prove the node lied.

Events are JSON arrays:

- ``["file", SHA, SIZE, CHUNK]``: the node shares this file, cut into chunks of CHUNK bytes;
- ``["have", SHA, I, PROV, DIGEST]``: chunk I is on its disk; PROV is the node that fetched it
  from the origin (or verified the whole file), DIGEST the chunk's digest as PROV reported it;
- ``["take", SHA, I, "o"|"p"]``: the node started fetching chunk I from the origin or a peer;
- ``["drop", SHA, I]``: chunk I is gone (it is being fetched again);
- ``["done", SHA]``: the whole file matched the trusted digest;
- ``["gone", SHA]``: the node no longer shares the file (what it said about it is void).

A chunk's digest is its BLAKE3 (256 bits, hex; :func:`chunk_digest`). Every byte a node takes
from a peer is hashed twice, for its chunk and for its file's sha256 (the trust anchor's), and
BLAKE3 ran at 3-4x sha256's speed here (4.4 against 1.2 GiB/s on one core, 4 MiB chunks): for
a node taking 512 MiB from its peers, about 0.3 CPU-s less hashing. Version 1 used sha256 for chunks
too; its paths were ``/swarm/v1/``, so a node of one version finds a node of the other absent
(404), never lying.

Peers are not trusted: every field is checked here, and an event that does not parse is
dropped (with the peer's other events; see :mod:`weightship.swarm.mesh`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from blake3 import blake3

VERSION = 2
EVENTS_PATH = "/swarm/v2/events"
BLOB_PATH = "/swarm/v2/blob/"
NODE_HEADER = "X-Weightship-Node"
CHUNK_HEADER = "X-Weightship-Chunk"
STREAM_TYPE = "application/x-ndjson"  # the events as a stream: one reply object per line
MAX_WAIT = 5.0  # seconds a long poll may be held
MAX_EVENTS = 20_000  # per reply; a reader asks again for the rest
MAX_REPLY = 32 << 20  # bytes of one events reply a reader accepts
MAX_SIZE = 1 << 50  # bytes of one file
MIN_CHUNK, MAX_CHUNK = 4096, 1 << 31

SHA256 = re.compile(r"^[0-9a-f]{64}$")
NODE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
RANGE = re.compile(r"^bytes=(\d{1,16})-(\d{1,16})$")


class BadEvent(ValueError):
    """A peer sent an event that does not parse."""


@dataclass(frozen=True)
class Event:
    """One checked event (see the module docstring)."""

    kind: str
    sha256: str
    index: int = -1
    size: int = 0
    chunk: int = 0
    origin: bool = False  # a "take" from the origin
    provenance: str = ""
    digest: str = ""


def chunk_digest(data: bytes | memoryview) -> str:
    """A chunk's digest, as the protocol carries it (see the module docstring)."""
    return blake3(data).hexdigest()


def chunks_of(size: int, chunk: int) -> int:
    """How many chunks of ``chunk`` bytes a file of ``size`` bytes has (at least one)."""
    return max(1, math.ceil(size / chunk))


def _int(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadEvent(f"{what} {value!r} is not an integer in [{low}, {high}]")
    return value


def _str(value: Any, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise BadEvent(f"{what} {str(value)[:80]!r} is malformed")
    return value


def parse_event(raw: Any, sizes: dict[str, tuple[int, int]]) -> Event:
    """Check one raw event; ``sizes`` (sha256 -> (size, chunk)) holds the files the peer
    announced, so chunk indices can be bounded (updated here when a "file" event arrives)."""
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise BadEvent(f"not an event: {str(raw)[:80]}")
    kind, args = raw[0], raw[1:]
    arity = {"file": 3, "have": 4, "take": 3, "drop": 2, "done": 1, "gone": 1}
    if kind not in arity or len(args) != arity[kind]:
        raise BadEvent(f"unknown event {kind!r} with {len(args)} fields")
    sha = _str(args[0], SHA256, "sha256")
    if kind == "file":
        size = _int(args[1], 0, MAX_SIZE, "size")
        chunk = _int(args[2], MIN_CHUNK, MAX_CHUNK, "chunk size")
        sizes[sha] = (size, chunk)
        return Event("file", sha, size=size, chunk=chunk)
    if kind in ("done", "gone"):
        return Event(kind, sha)
    if sha not in sizes:
        raise BadEvent(f"{kind} of a file never announced")
    index = _int(args[1], 0, chunks_of(*sizes[sha]) - 1, "chunk index")
    if kind == "have":
        return Event("have", sha, index, provenance=_str(args[2], NODE_ID, "provenance"),
                     digest=_str(args[3], SHA256, "chunk digest"))
    if kind == "take":
        if args[2] not in ("o", "p"):
            raise BadEvent(f"take from {args[2]!r}")
        return Event("take", sha, index, origin=args[2] == "o")
    return Event("drop", sha, index)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=A-B`` as the half-open ``(A, B + 1)`` within ``size``; None if malformed."""
    m = RANGE.match(header or "")
    if not m:
        return None
    start, last = int(m.group(1)), int(m.group(2))
    if start > last or last >= size:
        return None
    return start, last + 1
