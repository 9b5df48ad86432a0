"""One log line and Prometheus metrics per request, and the engine's state as gauges.

`Metrics.observe` is the engine loop's observer (it runs on the loop thread as each request
ends); the running / waiting / KV-page / preemption figures are read from the loop's stats
snapshot when Prometheus scrapes, so the loop pays nothing for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxinfer.serving.loop import LoopStats, RequestRecord

log = logging.getLogger("jaxinfer.serving")

# Seconds; from a few decode steps on a GPU to minutes of queueing on a crowded CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _EngineCollector:
    """Reads the loop's stats snapshot at scrape time."""

    def __init__(self, stats: Callable[[], LoopStats]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, doc, value in (
            ("jaxinfer_requests_running", "Requests holding KV pages.", s.running),
            ("jaxinfer_requests_waiting", "Requests submitted and not running.", s.waiting),
            (
                "jaxinfer_kv_pages_used",
                "KV cache pages in use.",
                s.kv_pages_total - s.kv_pages_free,
            ),
            ("jaxinfer_kv_pages_total", "KV cache pages in the pool.", s.kv_pages_total),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "jaxinfer_preemptions", "Requests preempted for KV pages.", value=s.preemptions
        )
        yield CounterMetricFamily("jaxinfer_engine_steps", "Engine steps run.", value=s.steps)


class Metrics:
    """Prometheus metrics of one server, in their own registry (several servers per process are fine)."""

    def __init__(self, stats: Callable[[], LoopStats]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jaxinfer_requests",
            "Requests ended, by outcome "
            "(stop, length, abort, invalid, error, rejected, unavailable).",
            ["outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "jaxinfer_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.output_tokens = Counter("jaxinfer_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "jaxinfer_time_to_first_token_seconds",
            "Submit to first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "jaxinfer_time_per_output_token_seconds",
            "Mean time between a request's tokens after its first.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jaxinfer_e2e_request_latency_seconds",
            "Submit to end.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(stats))

    def observe(self, rec: RequestRecord) -> None:
        """Logs one line for the request and counts it."""
        ttft = f"{rec.ttft_s:.3f}s" if rec.ttft_s is not None else "-"
        total = f"{rec.total_s:.3f}s" if rec.total_s is not None else "-"
        log.info(
            "request %s: %s, %d tokens in (%d cached), %d out, ttft %s, total %s",
            _printable(rec.request_id),
            rec.outcome,
            rec.prompt_tokens,
            rec.cached_tokens,
            rec.output_tokens,
            ttft,
            total,
        )
        self.requests.labels(rec.outcome).inc()
        self.prompt_tokens.inc(rec.prompt_tokens)
        self.output_tokens.inc(rec.output_tokens)
        if rec.ttft_s is not None:
            self.ttft.observe(rec.ttft_s)
            if rec.output_tokens > 1:
                self.tpot.observe((rec.total_s - rec.ttft_s) / (rec.output_tokens - 1))
        if rec.total_s is not None:
            self.e2e.observe(rec.total_s)

    def serve(self, port: int, host: str) -> int:
        """Serves /metrics over HTTP on a daemon thread; returns the port (0 picks one)."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return httpd.server_port

    def text(self) -> bytes:
        """The metrics in Prometheus' text format (the HTTP front's /metrics)."""
        return generate_latest(self.registry)


def _printable(name: str, limit: int = 200) -> str:
    """A caller's request name for one log line: control characters escaped, at most `limit`."""
    if name.isprintable() and len(name) <= limit:
        return name
    escaped = name.encode("unicode_escape").decode("ascii")
    return escaped[:limit] + ("..." if len(escaped) > limit else "")
