"""The event-loop stall histogram (``weightship_event_loop_blocked_seconds``): a stall of the
server's loop shows in ``/metrics``, and time its thread only waited for a CPU does not."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from tests.net import wait_until
from weightship.runtime.loop_monitor import LoopMonitor
from weightship.runtime.runner import BackgroundServer
from weightship.runtime.server import ServerState

BLOCK = 0.3  # seconds the loop is held


def _stalls_over(metrics: str, le: str) -> float:
    """Observations of the histogram in ``metrics`` over the bucket bound ``le``."""
    def value(pattern: str) -> float:
        found = re.search(pattern, metrics)
        assert found, f"{pattern} not in /metrics"
        return float(found.group(1))

    total = value(r"weightship_event_loop_blocked_seconds_count (\S+)")
    return total - value(rf'weightship_event_loop_blocked_seconds_bucket\{{le="{le}"\}} (\S+)')


@pytest.fixture
def server() -> Iterator[BackgroundServer]:
    """A server with no model loaded: /metrics and the loop monitor need none."""
    with BackgroundServer(ServerState("weightship-tiny")) as srv:
        yield srv


def test_a_handler_that_blocks_the_loop_shows_in_metrics(server: BackgroundServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the server reported no stall of its loop at all (no such histogram)."""
    metrics = server.state.metrics
    render = metrics.render

    def blocking_render() -> bytes:  # the /metrics handler, held up by a blocking call on the loop
        monkeypatch.setattr(metrics, "render", render)
        time.sleep(BLOCK)
        return render()

    wait_until(lambda: "weightship_event_loop_blocked_seconds_count" in httpx.get(server.url + "/metrics").text,
               10, "the loop monitor's first observation")
    before = _stalls_over(httpx.get(server.url + "/metrics").text, "0.25")
    monkeypatch.setattr(metrics, "render", blocking_render)
    httpx.get(server.url + "/metrics", timeout=10)
    wait_until(lambda: _stalls_over(httpx.get(server.url + "/metrics").text, "0.25") > before, 10,
               f"the {BLOCK} s stall in the histogram")


class FakeRunQueue:
    """A run-queue clock the test sets: seconds the loop's thread 'waited for a CPU'."""

    def __init__(self) -> None:
        self.waited = 0.0

    def __call__(self) -> float:
        return self.waited

    def close(self) -> None:
        pass


async def _hold_the_loop(waiting_for_cpu: bool) -> Histogram:
    """Run a monitor, hold its loop for BLOCK s (counted as run-queue wait or not), stop it."""
    blocked = Histogram("blocked", "", buckets=(0.25,), registry=CollectorRegistry())
    clock = FakeRunQueue()
    task = asyncio.create_task(LoopMonitor(blocked, run_queue=lambda: clock).run())
    await asyncio.sleep(0.05)
    time.sleep(BLOCK)
    if waiting_for_cpu:
        clock.waited += BLOCK
    await asyncio.sleep(0.05)
    task.cancel()
    return blocked


@pytest.mark.parametrize(("waiting_for_cpu", "counted"), [(False, True), (True, False)],
                         ids=["a blocking call", "a wait for a CPU"])
def test_only_time_the_loop_was_kept_from_running_is_counted(waiting_for_cpu: bool, counted: bool) -> None:
    blocked = asyncio.run(_hold_the_loop(waiting_for_cpu))
    [metric] = blocked.collect()
    over = {s.labels["le"]: s.value for s in metric.samples if s.name == "blocked_bucket"}
    assert over["+Inf"] - over["0.25"] == (1 if counted else 0), over
