"""A fleet's network on this machine, for the swarm tests and ``bench/fleet.py``.

``N`` nodes and one origin, each in its own network namespace with one veth link to a bridge;
each link shaped with ``tc`` (a token bucket each way) when a rate is given, and a byte counter
on the origin's link (the kernel's statistics of its veth). The nodes share this machine's file
system: only the network is theirs, which is all a fetch-only node needs (the systemd nodes of
``tests/deploy/nodes/nodelab.py`` are for the deployer). Needs root and iproute2.

Processes run in a namespace with :meth:`Host.popen`; :meth:`Host.link` cuts a link.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FLEETS = itertools.count()


def have_fleet() -> str | None:
    """Why a fleet cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass
class Host:
    """One namespace on the bridge: a node or the origin."""

    name: str
    netns: str
    veth: str  # the host side of its link
    address: str

    def popen(self, argv: Sequence[str | Path], **kw: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside this host's network namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *map(str, argv)], text=True, **kw)

    def sent(self) -> int:
        """Bytes this host has sent on its link (frames, headers included)."""
        return int(Path(f"/sys/class/net/{self.veth}/statistics/rx_bytes").read_text())

    def received(self) -> int:
        """Bytes this host has received on its link."""
        return int(Path(f"/sys/class/net/{self.veth}/statistics/tx_bytes").read_text())

    def link(self, up: bool) -> None:
        """Cut (or restore) the host's only link, as a pulled cable would."""
        _run("ip", "link", "set", self.veth, "up" if up else "down")


@dataclass
class Fleet:
    """``count`` nodes and an origin on a bridge; see the module docstring."""

    count: int
    rate_mbit: float | None = None  # each link, each way; None: unshaped
    origin: Host | None = None
    nodes: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = (os.getpid() % 10_000) * 10 + next(_FLEETS) % 10
        self.tag = f"{n:05d}"
        self.subnet = f"10.{100 + n % 50}.{(n // 50) % 250}"
        self.bridge = f"wsfb{self.tag}"

    def start(self) -> Fleet:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self.origin = self._host("origin", 0)
        self.nodes = [self._host(f"node{i + 1}", i + 1) for i in range(self.count)]
        return self

    def _host(self, name: str, i: int) -> Host:
        host = Host(name=name, netns=f"wsf{self.tag}n{i}", veth=f"wsf{self.tag}v{i}",
                    address=f"{self.subnet}.{10 + i}")
        _run("ip", "netns", "add", host.netns)
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"]):
            _run("ip", "netns", "exec", host.netns, *cmd)
        if self.rate_mbit:
            # A token bucket each way: the host side shapes what the host receives, eth0 inside
            # the namespace what it sends. The bucket holds ~2 ms of traffic (a NIC's queue).
            rate = f"{self.rate_mbit}mbit"
            burst = str(max(64 << 10, int(self.rate_mbit * 1e6 / 8 * 0.002)))
            shape = ["root", "tbf", "rate", rate, "burst", burst, "latency", "20ms"]
            _run("tc", "qdisc", "add", "dev", host.veth, *shape)
            _run("ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", "eth0", *shape)
        return host

    def stop(self) -> None:
        for host in [*([self.origin] if self.origin else []), *self.nodes]:
            for pid in _run("ip", "netns", "pids", host.netns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)  # only what this fleet started runs in its namespaces
            _run("ip", "link", "del", host.veth, check=False)
            _run("ip", "netns", "del", host.netns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    def __enter__(self) -> Fleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def fleet(count: int, rate_mbit: float | None = None) -> Iterator[Fleet]:
    """``count`` nodes and an origin on a bridge, torn down afterwards."""
    with Fleet(count, rate_mbit) as running:
        yield running
