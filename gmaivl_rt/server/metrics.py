"""Prometheus metrics under vLLM's names with a `gmaivl:` prefix, in a registry of the app's own.

Gauges (running, waiting, KV-cache use) and the prefix-cache hit counter are read from `engine.stats()` when
scraped; token counters and latency histograms are recorded as requests end. TTFT, end-to-end and queue time
count from the request's arrival (image decoding included), as vLLM's do. Every chat request is counted once by
its outcome (`OutcomeCounter`, an ASGI middleware): success, cancelled (the client left), client_error (a 4xx, or a
request that failed on its input mid-stream), server_error (a 5xx, or a failure mid-stream). Labels are closed
vocabularies only: nothing of a request's content ever becomes a label.
"""
from __future__ import annotations

import contextvars

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OUTCOMES = ("success", "cancelled", "client_error", "server_error")
COUNTED_PATHS = ("/v1/chat/completions", "/v1/gmaivl/archive/chat/completions")

# vLLM's bucket edges (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)
_DECODE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
        self.time_per_output_token = Histogram("gmaivl:time_per_output_token_seconds",
                                               "First to last generated token, per token after the first (one "
                                               "sample per request).", buckets=_ITL_BUCKETS, registry=r)
        self.image_decode_time = Histogram("gmaivl:image_decode_seconds",
                                           "Reading and decoding one request's images (requests with images).",
                                           buckets=_DECODE_BUCKETS, registry=r)
        self.requests = Counter("gmaivl:requests", "Chat requests by outcome: success, cancelled (client left), "
                                "client_error, server_error.", ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every outcome shows, at 0 until it happens
            self.requests.labels(outcome=outcome)

    def observe_ended(self, *, outcome: str, finish_reason: str, prompt_tokens: int, generated_tokens: int,
                      arrival: float, first_token: float | None, finish: float, scheduled: float | None,
                      token_gaps: list[float]) -> None:
        """Record one engine request that ended, whatever its outcome (`OUTCOMES`): the tokens it processed and its
        queue time always; the latencies (one set of requests for all, so their sums compare) and
        `request_success` only for a success. Times are one clock's seconds (time.monotonic / perf_counter)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        if scheduled is not None:
            self.request_queue_time.observe(max(0.0, scheduled - arrival))
        if outcome != "success":
            return
        if first_token is not None:
            self.time_to_first_token.observe(max(0.0, first_token - arrival))
        self.request_success.labels(finished_reason=finish_reason).inc()
        self.e2e_request_latency.observe(max(0.0, finish - arrival))
        for gap in token_gaps:
            self.inter_token_latency.observe(gap)
        if token_gaps:
            self.time_per_output_token.observe(sum(token_gaps) / len(token_gaps))

    def count_outcome(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def watch_decoding(self, decoding) -> None:
        """Gauges read from a `gmaivl_rt.server.decoding.ImageDecoding` when scraped: the pixel values reserved
        (`gmaivl:image_decode_pixels_in_use`, of `gmaivl:image_decode_pixels_capacity`) and the requests in its pool
        (`gmaivl:image_decode_requests`, decoding or queued)."""
        for name, text, read in (
                ("gmaivl:image_decode_pixels_in_use", "Decoded pixel values reserved by requests being served.",
                 lambda: decoding.pixels.in_use),
                ("gmaivl:image_decode_pixels_capacity", "The server's decoded pixel budget (--max-server-pixels).",
                 lambda: decoding.pixels.capacity),
                ("gmaivl:image_decode_requests", "Requests whose images are being decoded or wait for a decoder.",
                 lambda: decoding.decoding)):
            Gauge(name, text, registry=self.registry).set_function(read)


# The outcome of the HTTP request being served, for the `Generation` it starts (set by `OutcomeCounter`).
_current_outcome: contextvars.ContextVar = contextvars.ContextVar("gmaivl_request_outcome", default=None)


def current_outcome() -> "RequestOutcome | None":
    """The `RequestOutcome` of the chat request this code serves, or None outside one."""
    return _current_outcome.get()


class RequestOutcome:
    """What became of one HTTP request: its status (None: no answer was started) and the `Generation` it started,
    if any (whose own outcome decides when the answer began with 200: a stream can fail or be left midway)."""

    def __init__(self):
        self.status: int | None = None
        self.generation = None
        # For the audit log (`gmaivl_rt.server.audit`), set by the endpoint: its own request id, if it has one, and
        # the images it was sent (count, and SHA-256 hex digests of the bytes as received).
        self.request_id: str | None = None
        self.image_count = 0
        self.image_digests: list[str] = []
        self.stopped = False  # ended by the server's shutdown (`middleware.InternalErrors` answered it)

    def result(self, raised: bool = False) -> str:
        if self.stopped:
            return "cancelled"
        if raised or (self.status is not None and self.status >= 500):
            return "server_error"
        if self.status is not None and self.status >= 400:
            return "client_error"
        if self.generation is not None:
            return self.generation.outcome
        return "cancelled" if self.status is None else "success"


class OutcomeCounter:
    """ASGI middleware counting each request on `COUNTED_PATHS` once, by outcome, in `metrics.requests`; with an
    `audit` (`gmaivl_rt.server.audit.AuditLog`), also handing it each request it covers with the same outcome."""

    def __init__(self, app, metrics: ServerMetrics, audit=None):
        self.app, self.metrics, self.audit = app, metrics, audit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope["path"] in COUNTED_PATHS
        audited = self.audit is not None and self.audit.covers(scope["path"])
        if not (counted or audited):
            return await self.app(scope, receive, send)
        outcome = RequestOutcome()

        def ended(result: str):
            if counted:
                self.metrics.count_outcome(result)
            if audited:
                self.audit.record(scope, result, outcome)

        async def watched_send(message):
            if message["type"] == "http.response.start":
                outcome.status = int(message["status"])
            await send(message)

        token = _current_outcome.set(outcome)
        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            ended(outcome.result(raised=True))
            raise
        except BaseException:  # cancelled (the server is stopping, the connection is gone)
            ended("cancelled")
            raise
        finally:
            _current_outcome.reset(token)
        ended(outcome.result())
