"""Prometheus metrics under vLLM's names with a `gmaivl:` prefix, in a registry of the app's own.

Gauges (running, waiting, KV-cache use) and the prefix-cache hit counter are read from `engine.stats()` when
scraped; token counters and latency histograms are recorded as requests finish. TTFT, end-to-end and queue time
count from the request's arrival (image decoding included), as vLLM's do.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's bucket edges (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)


class _EngineStats:
    """A collector that reads the engine's own counters at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        try:
            stats = self.engine.stats()
        except Exception:  # a dead engine: /health says so; the scrape still answers
            return
        running = GaugeMetricFamily("gmaivl:num_requests_running", "Requests in the running batch.")
        running.add_metric([], float(stats.get("running", 0)))
        waiting = GaugeMetricFamily("gmaivl:num_requests_waiting", "Requests waiting to be scheduled.")
        waiting.add_metric([], float(stats.get("waiting", 0)))
        used, free = float(stats.get("kv_blocks_used", 0)), float(stats.get("kv_blocks_free", 0))
        usage = GaugeMetricFamily("gmaivl:kv_cache_usage_perc", "KV-cache blocks in use, as a fraction (0-1).")
        usage.add_metric([], used / (used + free) if used + free else 0.0)
        hits = CounterMetricFamily("gmaivl:prefix_cache_hits", "Requests whose prompt reused a cached prefix.")
        hits.add_metric([], float(stats.get("prefix_cache_hits", 0)))
        yield from (running, waiting, usage, hits)


class ServerMetrics:
    """The metrics one app exposes at /metrics."""

    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStats(engine))
        r = self.registry
        self.prompt_tokens = Counter("gmaivl:prompt_tokens", "Prefill tokens processed.", registry=r)
        self.generation_tokens = Counter("gmaivl:generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter("gmaivl:request_success", "Finished requests, by finish reason.",
                                       ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("gmaivl:time_to_first_token_seconds",
                                             "Arrival to first generated token.", buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("gmaivl:inter_token_latency_seconds", "Time between streamed tokens.",
                                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("gmaivl:e2e_request_latency_seconds", "Arrival to last token.",
                                             buckets=_REQUEST_BUCKETS, registry=r)
        self.request_queue_time = Histogram("gmaivl:request_queue_time_seconds",
                                            "Arrival to the start of the request's prefill.",
                                            buckets=_REQUEST_BUCKETS, registry=r)

    def observe_finished(self, *, finish_reason: str, prompt_tokens: int, generated_tokens: int, arrival: float,
                         first_token: float | None, finish: float, scheduled: float | None,
                         token_gaps: list[float]) -> None:
        """Record one finished request; times are one clock's seconds (time.monotonic / perf_counter)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.request_success.labels(finished_reason=finish_reason).inc()
        if first_token is not None:
            self.time_to_first_token.observe(max(0.0, first_token - arrival))
        if scheduled is not None:
            self.request_queue_time.observe(max(0.0, scheduled - arrival))
        self.e2e_request_latency.observe(max(0.0, finish - arrival))
        for gap in token_gaps:
            self.inter_token_latency.observe(gap)
