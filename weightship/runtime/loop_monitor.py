"""How long the event loop is kept from running: a task that sleeps 10 ms, again and again, and
records how late it wakes, less the time the kernel kept the loop's thread waiting for a CPU.

Lateness alone would measure the machine as much as the server: on a machine whose cores are
all busy (other processes, the engine's own threads), a thread that wants to run waits its
turn, and that wait says nothing about what the server does. The kernel counts that wait for
each thread (``/proc/thread-self/schedstat``: nanoseconds on a CPU, nanoseconds runnable but
waiting for one), so what is left of the lateness is the time the loop was busy with one
callback, waiting for the GIL that another thread of the server held, or blocked in a call
(a file read, an fsync) — each a stall every request, ``/health`` included, waits out. (A
thread that holds the GIL while it waits for a CPU still counts: a few milliseconds on a busy
machine.) Where the kernel does not report it, the loop thread's own CPU time over the late
interval is used, which misses the GIL and blocking calls but never counts the machine's load.

Each wake is observed in the ``weightship_event_loop_blocked_seconds`` histogram; a stall of
half a second or more is also logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from prometheus_client import Histogram

log = logging.getLogger(__name__)

INTERVAL = 0.010  # seconds between wakes
LOGGED = 0.5  # a stall this long is logged too


class Clock(Protocol):
    """A count of seconds (called) that holds a file until closed."""

    def __call__(self) -> float: ...

    def close(self) -> None: ...


class RunQueueClock:
    """Seconds the thread that opened it has waited for a CPU so far (the kernel's count)."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)  # this thread's, read from any

    def __call__(self) -> float:
        return int(os.pread(self.fd, 64, 0).split()[1]) / 1e9

    def close(self) -> None:
        os.close(self.fd)

    @classmethod
    def open(cls) -> RunQueueClock | None:
        """The calling thread's clock, or None where the kernel does not count."""
        try:
            clock = cls()
        except OSError:
            return None
        try:
            clock()
        except (OSError, IndexError, ValueError):
            clock.close()
            return None
        return clock


class LoopMonitor:
    """Runs on the loop it watches (:meth:`run`, a task for the server's lifetime).
    ``run_queue`` opens the loop thread's :class:`RunQueueClock` (a test's own, to fake one)."""

    def __init__(self, blocked: Histogram, interval: float = INTERVAL,
                 run_queue: Callable[[], Clock | None] = RunQueueClock.open) -> None:
        self.blocked, self.interval, self.run_queue = blocked, interval, run_queue

    async def run(self) -> None:
        """Measure until cancelled."""
        waited = self.run_queue()  # opened on the loop's thread
        try:
            await self._measure(waited)
        finally:
            if waited is not None:
                waited.close()

    async def _measure(self, waited: Clock | None) -> None:
        loop = asyncio.get_running_loop()
        clock: Callable[[], float] = time.thread_time if waited is None else waited
        before = clock()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            late = max(0.0, loop.time() - due)
            now = clock()
            # no run-queue count: the loop thread's CPU time over the interval, at most the lateness
            stall = min(late, now - before) if waited is None else max(0.0, late - (now - before))
            before = now
            self.blocked.observe(stall)
            if stall >= LOGGED:
                log.warning("the event loop was blocked for %.0f ms", stall * 1000)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the monitor while the body runs (the server's lifespan)."""
        task = asyncio.create_task(self.run(), name="weightship-loop-monitor")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
