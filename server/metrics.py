"""Prometheus metrics of one app, in its own CollectorRegistry (several apps per process stay apart)."""

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
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
        self.rate_limited = Counter(
            "lorag_chat_rate_limited", "Chat requests refused with 429: a tenant over its per-minute budget or share",
            ["reason"], registry=self.registry,
        )

    def watch_engine(self, stats: Callable[[], dict]) -> None:
        """Report the engine's KV cache from ``stats()`` (a dict with kv_blocks_used/cached/free and
        prefix_hit_rate), read once at every scrape."""
        self.registry.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's KV cache gauges from one ``stats()`` call per scrape, so that one scrape's used + cached + free
    blocks come from the same moment and add up to the pool."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def describe(self) -> list:
        return [self._blocks(), self._hit_rate()]  # the names, for the registry's duplicate check; no reading

    def collect(self):
        stats = self.stats()
        blocks = self._blocks()
        for state in ("used", "cached", "free"):
            blocks.add_metric([state], stats[f"kv_blocks_{state}"])
        yield blocks
        hit_rate = self._hit_rate()
        hit_rate.add_metric([], stats["prefix_hit_rate"])
        yield hit_rate

    @staticmethod
    def _blocks() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "lorag_engine_kv_blocks", "Engine KV cache blocks: used by running requests, cached (kept for shared "
            "prompt prefixes, evicted when needed) or free", labels=["state"])

    @staticmethod
    def _hit_rate() -> GaugeMetricFamily:
        return GaugeMetricFamily("lorag_engine_prefix_cache_hit_rate",
                                 "Share of prompt tokens found in the engine's prefix cache")
