"""The server's figures in Prometheus' text format (GET /metrics): requests, tokens, latency, load.

The access log counts requests as they end; the worker counts each finished reply's tokens and
timings and keeps the load gauges (queue depth, running sequences, KV-cache bytes) up to date.
Each server has its own registry, so two in one process (as in tests) count apart.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "mlx_gemma4u"
CONTENT_TYPE = CONTENT_TYPE_LATEST
ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/models",
        "/",
        "/health",
        "/metrics",
    }
)


class Metrics:
    """One server's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", text, labels, registry=self.registry)

        self.requests = counter("requests", "HTTP requests by endpoint and status", ("endpoint", "status"))
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens of finished replies")
        self.cached_tokens = counter("cached_tokens", "prompt tokens taken from the prefix cache")
        self.generation_tokens = counter("generation_tokens", "tokens generated")
        self.prefix_hits = counter("prefix_cache_hits", "requests that started from a cached prefix")
        self.drafted = counter("draft_tokens", "tokens drafted by the MTP assistant")
        self.accepted = counter("draft_accepted_tokens", "drafted tokens accepted")
        self.first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "seconds from a request's arrival at the engine's queue to its first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.per_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "seconds per token after the first, per reply",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        self.queued = Gauge(f"{PREFIX}_queue_depth", "requests waiting for the engine", registry=self.registry)
        self.running = Gauge(f"{PREFIX}_running_sequences", "sequences decoding", registry=self.registry)
        self.kv_bytes = Gauge(f"{PREFIX}_kv_cache_bytes", "bytes of KV caches held", registry=self.registry)

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def reply(self, response, first_token_seconds: float | None, decode_seconds: float) -> None:
        """A finished reply's figures (the engine's BatchResponse)."""
        self.prompt_tokens.inc(response.prompt_tokens)
        self.cached_tokens.inc(response.prompt_tokens - response.prefilled_tokens)
        self.generation_tokens.inc(response.generation_tokens)
        if first_token_seconds is not None:
            self.first_token.observe(first_token_seconds)
        if response.generation_tokens > 1:
            self.per_token.observe(decode_seconds / (response.generation_tokens - 1))
        if response.draft is not None:
            self.drafted.inc(response.draft.drafted)
            self.accepted.inc(response.draft.accepted)

    def text(self) -> bytes:
        return generate_latest(self.registry)
