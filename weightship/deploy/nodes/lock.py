"""The per-host rollout lock: ``flock`` held by a process on the node that lives while we do.

The holder exits when our SSH channel closes (a ``kill -9`` of the deployer closes its
connection) or when no heartbeat came for ``LOCK_LEASE_S`` (a network cut), so a lock is never
left behind. If the holder goes while we still work (the lease lapsed because this process was
stopped), :attr:`HostLock.lost` turns true and no further change is made on that host.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex

import asyncssh

from weightship.deploy.nodes.ssh import Node
from weightship.errors import NodeCommandError, NodeLockedError, NodeUnreachableError

LOCK_LEASE_S = 30  # a lock whose holder has not been heard from for this long is let go
_HOLDER = ("import select, sys\n"
           "print('locked', flush=True)\n"
           f"while select.select([sys.stdin], [], [], {LOCK_LEASE_S})[0] and sys.stdin.readline():\n"
           "    pass\n")


class HostLock:
    """The lock of one host, taken with :meth:`acquire`, let go with :meth:`release`."""

    def __init__(self, node: Node, prefix: str, python: str) -> None:
        self.node, self.prefix, self.python = node, prefix, python
        self.process: asyncssh.SSHClientProcess[str] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._released = False

    async def acquire(self) -> None:
        """Take the lock, or raise :class:`NodeLockedError` if another rollout holds it."""
        prefix = shlex.quote(self.prefix)
        holder = f"{shlex.quote(self.python)} -c {shlex.quote(_HOLDER)}"
        command = self.node.wrap(f"mkdir -p {prefix} && exec flock -n -E 75 {prefix}/.lock {holder}")
        try:
            self.process = await self.node.conn.create_process(command)
            line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            raise NodeUnreachableError(self.node.host.name, f"taking the lock: {e}") from None
        if line.strip() != "locked":
            code = (await self.process.wait()).exit_status
            if code == 75:
                raise NodeLockedError(self.node.host.name)
            raise NodeCommandError(self.node.host.name, "lock", f"flock exited {code}")
        self._beat = asyncio.ensure_future(self._heartbeat())

    @property
    def lost(self) -> bool:
        """The holder is gone while we did not let go: another rollout may hold the lock now."""
        return not self._released and (self.process is None or self.process.exit_status is not None
                                       or self.process.is_closing())

    async def _heartbeat(self) -> None:
        assert self.process is not None
        with contextlib.suppress(OSError, asyncssh.Error):
            while True:
                await asyncio.sleep(LOCK_LEASE_S / 3)
                self.process.stdin.write("\n")

    def release(self) -> None:
        """Let go of the lock (the holder sees end of input and exits)."""
        self._released = True
        if self._beat is not None:
            self._beat.cancel()
        if self.process is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.process.stdin.write_eof()
