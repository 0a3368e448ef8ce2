"""Prometheus metrics for one app, on its own CollectorRegistry (two apps in one process never share counters).

Request-side metrics (requests, prompt tokens, latencies) are recorded by the handlers; engine-side ones
(waiting, running, cache usage, generated tokens) are read from the engine loop's latest snapshot at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable

from ..engine import EngineStats

# Seconds; CPU runs of small models sit at the low end, long prompts on big models at the high end.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine_stats: Callable[[], EngineStats]):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("openseek_requests", "HTTP requests answered, by route and status code (a stream that "
                                "ends in an error event counts as 500)",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("openseek_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.ttft = Histogram("openseek_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("openseek_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self) -> tuple[bytes, str]:
        """The text exposition format: (body, content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Reads the engine snapshot when scraped, so the gauges are never stale."""

    def __init__(self, engine_stats: Callable[[], EngineStats]):
        self.engine_stats = engine_stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.engine_stats()
        yield GaugeMetricFamily("openseek_num_requests_waiting", "Sequences waiting for admission", value=s.waiting)
        yield GaugeMetricFamily("openseek_num_requests_running", "Sequences being generated", value=s.running)
        yield GaugeMetricFamily("openseek_kv_cache_usage", "Fraction of KV-cache blocks in use (0 to 1)",
                                value=s.cache_usage)
        yield CounterMetricFamily("openseek_generation_tokens", "Tokens generated, aborted requests' included",
                                  value=s.generation_tokens)
