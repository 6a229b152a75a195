"""Prometheus metrics of one app, in its own CollectorRegistry (several apps per process stay apart)."""

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_* (CPU seconds, resident memory, open fds, start time) and python_info, as every Python exporter
        # shows them; they describe the process, so two apps in one process report the same values.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "lorag_http_requests", "HTTP requests answered", ["route", "method", "status", "tenant"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lorag_http_request_seconds", "Time to the end of the response", ["route", "tenant"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "lorag_time_to_first_token_seconds", "Chat request start to first answer text", ["tenant"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.retrieval = Histogram(
            "lorag_retrieval_seconds", "Retrieval time per request", ["tenant"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter(
            "lorag_generated_tokens", "Answer tokens generated", ["tenant", "generator"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "lorag_prompt_tokens", "Prompt tokens processed", ["tenant", "generator"], registry=self.registry
        )
        self.in_flight = Gauge("lorag_chat_in_flight", "Chat requests generating now", registry=self.registry)
        self.queued = Gauge("lorag_chat_queued", "Chat requests waiting for a slot", registry=self.registry)
        self.rejected = Counter(
            "lorag_chat_rejected", "Chat requests refused with 503 because the queue was full",
            registry=self.registry,
        )
        self.kv_blocks = Gauge(
            "lorag_engine_kv_blocks", "Engine KV cache blocks: used by running requests, cached (kept for shared "
            "prompt prefixes, evicted when needed) or free", ["state"], registry=self.registry,
        )
        self.prefix_hit_rate = Gauge(
            "lorag_engine_prefix_cache_hit_rate", "Share of prompt tokens found in the engine's prefix cache",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "lorag_chat_rate_limited", "Chat requests refused with 429: a tenant over its per-minute budget or share",
            ["reason"], registry=self.registry,
        )

    def watch_engine(self, stats) -> None:
        """Report the engine's KV cache from ``stats()`` (a dict with kv_blocks_used/cached/free and
        prefix_hit_rate), read at every scrape."""
        for state in ("used", "cached", "free"):
            self.kv_blocks.labels(state).set_function(lambda state=state: stats()[f"kv_blocks_{state}"])
        self.prefix_hit_rate.set_function(lambda: stats()["prefix_hit_rate"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
