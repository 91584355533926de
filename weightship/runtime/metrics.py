"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from weightship.runtime.engine import EngineStats

ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready",
                    "/metrics"})
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Request, token and latency counters, and gauges read from the engine at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("weightship_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("weightship_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("weightship_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "weightship_time_to_first_token_seconds", "From a request's arrival to its first token",
            buckets=_LATENCY, registry=r)
        self.time_per_output_token = Histogram(
            "weightship_time_per_output_token_seconds", "Mean time between a request's tokens",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.loop_blocked = Histogram(  # observed by runtime.loop_monitor.LoopMonitor
            "weightship_event_loop_blocked_seconds", "How late the event loop ran a 10 ms timer, "
            "less the time its thread waited for a CPU: time the server could answer nothing",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r)

        def read(field: str) -> Callable[[], float]:
            return lambda: float(getattr(stats(), field, 0.0) or 0.0)

        Gauge("weightship_queue_depth", "Requests waiting for a slot",
              registry=r).set_function(read("waiting"))
        Gauge("weightship_running_requests", "Requests in the running batch",
              registry=r).set_function(read("running"))
        Gauge("weightship_kv_cache_usage_ratio", "Fraction of KV-cache entries in use",
              registry=r).set_function(read("cache_usage"))

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
