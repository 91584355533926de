"""Peers without a tracker: ``--peer HOST:PORT`` and ``--peers-from-dns NAME[:PORT]``.

In a Kubernetes cluster a headless Service resolves to one A/AAAA record per ready pod, so
resolving it again every few seconds finds seeders that started after us (the Helm chart's
seeders, or nodes that finished their own download).
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass, field

from weightship.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_PORT = 6881
_BRACKETED = re.compile(r"^\[(?P<host>[^\]]+)\](?::(?P<port>\d+))?$")
_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd]?)$")


def parse_endpoint(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port)."""
    m = _BRACKETED.match(text)
    if m:
        host, port = m["host"], m["port"]
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" not in text:
        host, port = text, None
    else:
        raise UsageError(f"peer {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if port is None:
        if default_port is None:
            raise UsageError(f"peer {text!r} needs a port: HOST:PORT")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise UsageError(f"peer {text!r}: expected HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` as seconds; ``0`` or ``forever`` as infinity."""
    if text.strip().lower() in ("forever", "inf"):
        return float("inf")
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise UsageError(f"duration {text!r}: expected e.g. 90, 30s, 10m, 2h or forever")
    seconds = float(m["n"]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m["unit"]]
    return seconds if seconds > 0 else float("inf")


def resolve_all(name: str, port: int) -> list[tuple[str, int]]:
    """Every A and AAAA record of ``name``, as endpoints; empty when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except OSError as e:
        log.info("cannot resolve %s: %s", name, e)
        return []
    return sorted({(str(info[4][0]), port) for info in infos})


@dataclass
class PeerSource:
    """The peers to connect to: explicit endpoints, plus a DNS name resolved on every refresh."""

    explicit: list[tuple[str, int]] = field(default_factory=list)
    dns_name: str | None = None
    dns_port: int = DEFAULT_PORT

    @classmethod
    def from_options(cls, peers: list[str] | tuple[str, ...] = (), dns: str | None = None) -> PeerSource:
        """Parse the CLI's ``--peer`` and ``--peers-from-dns`` values."""
        source = cls(explicit=[parse_endpoint(p) for p in peers])
        if dns:
            source.dns_name, source.dns_port = parse_endpoint(dns, default_port=DEFAULT_PORT)
        return source

    def endpoints(self) -> list[tuple[str, int]]:
        """The peers as of now (DNS resolved afresh)."""
        found = list(self.explicit)
        if self.dns_name:
            found += resolve_all(self.dns_name, self.dns_port)
        return found
