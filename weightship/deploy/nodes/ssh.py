"""SSH to the nodes (asyncssh): pinned host keys, reused connections, a timeout on every step.

Host keys: a node's key must be pinned, in the inventory's ``known_hosts`` file (which
``weightship nodes trust`` writes) or as a ``host_keys`` fingerprint. An unknown key is refused
(:class:`~weightship.errors.HostKeyUnknownError`); a key other than the pinned one is always
refused, with both fingerprints (:class:`~weightship.errors.HostKeyChangedError`). Nothing is
sent to a node before its key checks out: the check is part of the key exchange.

Losing a node is never mistaken for a node that failed: a connection that cannot be made or
stops answering (TCP keepalives and SSH keepalives) raises
:class:`~weightship.errors.NodeUnreachableError`, and callers stop nothing because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from weightship.deploy.nodes.inventory import Host, Inventory
from weightship.errors import (
    DeployError,
    HostKeyChangedError,
    HostKeyError,
    HostKeyUnknownError,
    NodeCommandError,
    NodeUnreachableError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 15.0
KEEPALIVE_INTERVAL = 5.0  # a silent node is declared unreachable after 3 missed keepalives
KEY_ALGORITHMS = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256"]


def fingerprint(key: asyncssh.SSHKey) -> str:
    """``SHA256:…`` as OpenSSH prints it (always whole)."""
    return str(key.get_fingerprint("sha256"))


def _known_hosts(path: Path) -> asyncssh.SSHKnownHosts | None:
    try:
        return asyncssh.import_known_hosts(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DeployError(f"cannot read known_hosts {path}: {e}") from None


def pinned_keys(inventory: Inventory, host: Host) -> list[asyncssh.SSHKey]:
    """The keys ``known_hosts`` pins for ``host``."""
    known = _known_hosts(inventory.known_hosts)
    if known is None:
        return []
    return list(known.match(host.address, host.address, host.port)[0])


def pinned_fingerprints(inventory: Inventory, host: Host) -> list[str]:
    """Every fingerprint pinned for ``host``: its known_hosts keys and the inventory's ``host_keys``."""
    return sorted({fingerprint(k) for k in pinned_keys(inventory, host)} | set(host.host_keys))


class _PinnedClient(asyncssh.SSHClient):
    """Accepts a host key whose fingerprint is pinned; remembers what the node presented."""

    def __init__(self, fingerprints: Sequence[str]) -> None:
        self.fingerprints = set(fingerprints)
        self.presented: str | None = None

    def validate_host_public_key(self, host: str, addr: tuple[str, int] | str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.presented = fingerprint(key)
        return self.presented in self.fingerprints


@dataclass
class Completed:
    """A finished command on a node."""

    code: int
    stdout: str
    stderr: str


class Node:
    """An open connection to one host; every step on it goes through :meth:`run`."""

    def __init__(self, host: Host, conn: asyncssh.SSHClientConnection) -> None:
        self.host = host
        self.conn = conn

    def wrap(self, command: str) -> str:
        return f"sudo -n -- sh -c {shlex.quote(command)}" if self.host.sudo else command

    async def run(self, command: str, *, step: str, timeout: float, input: str | None = None,
                  check: bool = True) -> Completed:
        """Run ``command`` (a shell line) on the node; ``step`` names it in errors.

        ``input`` goes to its stdin: secrets travel there, never on a command line.
        """
        try:
            result = await asyncio.wait_for(
                self.conn.run(self.wrap(command), input=input, check=False), timeout)
        except asyncio.TimeoutError:
            raise NodeCommandError(self.host.name, step, f"no answer within {timeout:.0f} s") from None
        except (OSError, asyncssh.Error) as e:
            raise NodeUnreachableError(self.host.name, f"connection lost during {step}: {e}") from None
        done = Completed(result.exit_status if result.exit_status is not None else -1,
                         str(result.stdout or ""), str(result.stderr or ""))
        if check and done.code != 0:
            detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise NodeCommandError(self.host.name, step, detail[-1] if detail else f"exit {done.code}")
        return done

    async def write(self, path: str, data: str, *, mode: int = 0o644, step: str, timeout: float = 60) -> None:
        """Replace ``path`` atomically with ``data`` (sent on stdin), made with ``mode``."""
        tmp = f"{path}.tmp-weightship"
        # Parents get the default mode (the service user must traverse them); the file is made
        # private first and given ``mode`` only once it is whole.
        await self.run(f"mkdir -p {shlex.quote(str(Path(path).parent))} && (umask 077 && cat > {shlex.quote(tmp)}) "
                       f"&& chmod {mode:o} {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(path)}",
                       step=step, timeout=timeout, input=data)

    async def upload(self, files: Sequence[Path], directory: str, *, step: str, timeout: float) -> None:
        """Copy ``files`` into ``directory`` by SFTP (many requests in flight)."""
        try:
            async with self.conn.start_sftp_client() as sftp:
                await asyncio.wait_for(sftp.put([str(f) for f in files], directory, preserve=False), timeout)
        except asyncio.TimeoutError:
            raise NodeCommandError(self.host.name, step, f"no answer within {timeout:.0f} s") from None
        except asyncssh.SFTPError as e:
            raise NodeCommandError(self.host.name, step, str(e.reason)) from None
        except (OSError, asyncssh.Error) as e:
            raise NodeUnreachableError(self.host.name, f"connection lost during {step}: {e}") from None


class Connections:
    """One SSH connection per host for the length of a command, opened on first use."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._open: dict[str, asyncio.Task[Node]] = {}

    def get(self, host: Host) -> asyncio.Task[Node]:
        """The (pending or made) connection to ``host``."""
        if host.name not in self._open:
            self._open[host.name] = asyncio.ensure_future(self._connect(host))
        return self._open[host.name]

    async def node(self, host: Host) -> Node:
        return await asyncio.shield(self.get(host))

    def _options(self, host: Host) -> dict[str, Any]:
        keys = [str(host.identity)] if host.identity else None
        return {"port": host.port, "username": host.user, "client_keys": keys,
                "agent_path": None if keys else (),  # an identity file means no agent
                "config": None, "connect_timeout": CONNECT_TIMEOUT,
                "keepalive_interval": KEEPALIVE_INTERVAL, "keepalive_count_max": 3,
                # Only the pins decide: no X.509 host certificate from ~/.ssh is trusted instead.
                "x509_trusted_certs": None, "x509_trusted_cert_paths": None}

    async def _connect(self, host: Host) -> Node:
        tunnel = (await self.node(self.inventory.hosts[host.jump])).conn if host.jump else None
        pins = pinned_fingerprints(self.inventory, host)
        keys = pinned_keys(self.inventory, host)
        # With keys pinned, asyncssh asks for their algorithms. With fingerprints only, each
        # algorithm is asked in turn (a pinned ECDSA key is not "changed" because the server also
        # has ed25519). Unknown hosts: ed25519 first, the key `ssh-keygen -lf` users compare.
        attempts: list[dict[str, Any]] = [{}] if keys else \
            [{"server_host_key_algs": [a]} for a in KEY_ALGORITHMS] if pins else \
            [{"server_host_key_algs": KEY_ALGORITHMS}]
        presented: list[str] = []
        for algorithms in attempts:
            client = _PinnedClient(pins)
            try:
                conn, _ = await asyncio.wait_for(asyncssh.create_connection(
                    lambda c=client: c, host.address, tunnel=tunnel, known_hosts=(keys, [], []),  # type: ignore[misc]
                    **algorithms, **self._options(host)), CONNECT_TIMEOUT + 5)
                break
            except asyncssh.HostKeyNotVerifiable:
                presented.append(client.presented or "a key of another type")
            except asyncssh.KeyExchangeFailed:
                continue  # the server has no key of this algorithm
            except asyncssh.PermissionDenied as e:
                raise DeployError(f"{host.name}: SSH login as {host.user} refused: {e.reason}",
                                  hint="check `identity:` in the inventory or the ssh-agent's keys") from None
            except (OSError, asyncio.TimeoutError, asyncssh.Error) as e:
                raise NodeUnreachableError(host.name, str(e) or type(e).__name__) from None
        else:
            if pins:
                raise HostKeyChangedError(host.name, pins, ", ".join(presented) or "no key of a pinned type")
            raise HostKeyUnknownError(host.name, presented[0] if presented else "?", str(self.inventory.path))
        return Node(host, conn)

    async def close(self) -> None:
        for task in self._open.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().conn.close()
            else:
                task.cancel()
        for task in self._open.values():
            with contextlib.suppress(BaseException):
                await task
                await task.result().conn.wait_closed()


@contextlib.asynccontextmanager
async def connections(inventory: Inventory) -> AsyncIterator[Connections]:
    """Connections to the inventory's hosts, closed afterwards."""
    pool = Connections(inventory)
    try:
        yield pool
    finally:
        await pool.close()


def on_hosts(inventory: Inventory, hosts: Sequence[Host],
             work: Callable[[Node], Awaitable[T]]) -> dict[str, T | Exception]:
    """``work`` on every host at once, each over its own connection: a host's result, or the
    error that stopped it (one host's failure never stops the others). A changed or unknown host
    key is raised: nothing of the command should run then."""
    async def main() -> dict[str, T | Exception]:
        async with connections(inventory) as pool:
            async def one(host: Host) -> T | Exception:
                try:
                    return await work(await pool.node(host))
                except HostKeyError:
                    raise
                except (DeployError, OSError) as e:
                    return e
            results = await asyncio.gather(*(one(h) for h in hosts))
        return dict(zip((h.name for h in hosts), results, strict=True))

    return asyncio.run(main())


async def scan(inventory: Inventory, host: Host) -> str:
    """The fingerprint ``host`` presents (for ``nodes trust``), ed25519 preferred; sends nothing."""
    tunnel = None
    pool = Connections(inventory) if host.jump else None
    try:
        if pool is not None and host.jump:
            tunnel = (await pool.node(inventory.hosts[host.jump])).conn
        key = await asyncio.wait_for(asyncssh.get_server_host_key(
            host.address, host.port, tunnel=tunnel, server_host_key_algs=KEY_ALGORITHMS), CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError, asyncssh.Error) as e:
        raise NodeUnreachableError(host.name, str(e) or type(e).__name__) from None
    finally:
        if pool is not None:
            await pool.close()
    if key is None:
        raise DeployError(f"{host.name}: the server presented no host key")
    return key.export_public_key("openssh").decode().split("\n")[0].strip()


def record(inventory: Inventory, host: Host, public_key: str) -> None:
    """Pin ``public_key`` (OpenSSH one-line form) for ``host`` in the inventory's known_hosts."""
    path = inventory.known_hosts
    old = path.read_text() if path.exists() else ""
    kind, blob = public_key.split()[:2]
    line = f"{host.target} {kind} {blob}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(old + ("" if not old or old.endswith("\n") else "\n") + line)
    tmp.replace(path)


def key_fingerprint(public_key: str) -> str:
    """The SHA256 fingerprint of an OpenSSH one-line public key."""
    return fingerprint(asyncssh.import_public_key(public_key))
