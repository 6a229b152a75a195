"""The vLLM servers' state in the app's Prometheus registry, read from the pool when /metrics is scraped."""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.generation.remote_pool import RemotePool


class RemoteCollector:
    """A custom collector: the pool already keeps these numbers, so they are read at scrape time, not mirrored."""

    def __init__(self, pool: RemotePool):
        self.pool = pool

    def collect(self):
        up = GaugeMetricFamily("lorag_remote_up", "1 when the vLLM server answered last time, else 0", labels=["server"])
        adapters = GaugeMetricFamily("lorag_remote_adapters", "lorag adapters loaded on the vLLM server",
                                     labels=["server"])
        for state in self.pool.states():
            up.add_metric([state["server"]], 1.0 if state["up"] else 0.0)
            adapters.add_metric([state["server"]], state["adapters"])
        failures = CounterMetricFamily("lorag_remote_failures", "vLLM server failures by reason",
                                       labels=["server", "reason"])
        for (server, reason), count in sorted(self.pool.failures.items()):
            failures.add_metric([server, reason], count)
        pushes = CounterMetricFamily("lorag_remote_adapter_pushes", "Adapters pushed to the vLLM server",
                                     labels=["server"])
        for server, count in sorted(self.pool.pushes.items()):
            pushes.add_metric([server], count)
        failovers = CounterMetricFamily("lorag_remote_failovers", "Requests moved to another vLLM server")
        failovers.add_metric([], self.pool.failovers)
        yield from (up, adapters, failures, pushes, failovers)
