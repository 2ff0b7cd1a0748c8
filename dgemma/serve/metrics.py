"""Prometheus metrics for `dgemma serve` (GET /metrics, text exposition format).

What it does: counters for requests (by route and finish reason) and tokens, histograms for denoising-step and
canvas latency, batch occupancy (rows per step), time to first token and request latency; gauges read from
`Scheduler.metrics()` at scrape time (queue depth, active rows, max batch, engine totals).

Design choices:
- One `CollectorRegistry` per app, not the global one, so that several apps (tests) never clash.
- The step and canvas observers run on the engine thread; prometheus_client's metrics are thread-safe and an
  observation is a few hundred nanoseconds, so the engine is not slowed.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
_REQUEST = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self, engine_metrics: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dgemma_requests", "Finished requests", ["route", "finish_reason"], registry=r)
        self.errors = Counter("dgemma_request_errors", "Requests answered with an error", ["status"], registry=r)
        self.prompt_tokens = Counter("dgemma_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_prompt_tokens = Counter("dgemma_cached_prompt_tokens", "Prompt tokens reused from the prefix "
                                            "cache", registry=r)
        self.generation_tokens = Counter("dgemma_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.step_seconds = Histogram("dgemma_step_seconds", "Denoising step latency (one decoder pass + sampler "
                                      "for the whole batch)", buckets=_LATENCY, registry=r)
        self.canvas_seconds = Histogram("dgemma_canvas_seconds", "Canvas latency (all its steps + commit)",
                                        buckets=_LATENCY, registry=r)
        self.batch_rows = Histogram("dgemma_batch_occupancy", "Rows (requests) in the batch at each step",
                                    buckets=_ROWS, registry=r)
        self.ttft_seconds = Histogram("dgemma_time_to_first_token_seconds", "Time to the first committed canvas",
                                      buckets=_REQUEST, registry=r)
        self.request_seconds = Histogram("dgemma_request_seconds", "Request latency, queueing included",
                                         buckets=_REQUEST, registry=r)
        r.register(_EngineGauges(engine_metrics))

    # observers handed to the Scheduler (called on the engine thread)
    def on_step(self, seconds: float, rows: int) -> None:
        self.step_seconds.observe(seconds)
        self.batch_rows.observe(rows)

    def on_canvas(self, seconds: float, rows: int) -> None:
        self.canvas_seconds.observe(seconds)

    def on_finished(self, route: str, finish_reason: str, usage: dict) -> None:
        self.requests.labels(route, finish_reason).inc()
        self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.cached_prompt_tokens.inc(usage.get("cached_prompt_tokens", 0) or 0)
        self.generation_tokens.inc(usage.get("completion_tokens", 0))
        if usage.get("ttft_s") is not None:
            self.ttft_seconds.observe(usage["ttft_s"])
        if usage.get("total_s") is not None:
            self.request_seconds.observe(usage["total_s"])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """Every number in `Scheduler.metrics()` as a gauge `dgemma_engine_<name>`, read at scrape time."""

    def __init__(self, read: Callable[[], dict]):
        self.read = read

    def describe(self):
        return []  # values are only known at scrape time; nothing to check for duplicates up front

    def collect(self):
        for name, value in sorted(self.read().items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            yield GaugeMetricFamily(f"dgemma_engine_{name}", f"Scheduler.metrics()['{name}']", value=value)
