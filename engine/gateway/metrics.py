"""The gateway's Prometheus metrics (its own registry, so several gateways can live in one test process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# No `<counter|histogram>_created` series: the exposition passes `promtool check metrics` (process-wide switch).
disable_created_metrics()


class _BackendsCollector(Collector):
    def __init__(self, counts: Callable[[], dict[tuple[str, str], int]]):
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "moefleet_gateway_backends",
            "Backend groups known to the gateway, by role and state (ready, unhealthy, not_listed, draining).",
            labels=["role", "state"],
        )
        for (role, state), count in sorted(self._counts().items()):
            family.add_metric([role, state], float(count))
        yield family


class GatewayMetrics:
    def __init__(self, backend_counts: Callable[[], dict[tuple[str, str], int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "moefleet_gateway_requests",
            "Requests answered by the gateway, by serving role and HTTP status code.",
            ["role", "code"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "moefleet_gateway_upstream_seconds",
            "Time from sending a request upstream to its last byte relayed.",
            ["role"],
            buckets=UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "moefleet_gateway_retries",
            "Requests sent again to another backend after the first failed before any byte was relayed.",
            ["role"],
            registry=self.registry,
        )
        self.kv_transfer_seconds = Histogram(
            "moefleet_gateway_kv_transfer_seconds",
            "Disaggregated mode: the prefill leg of a request, from sending it to a prefill group until that group "
            "answered (prompt computed, KV pushed to the decode group and acknowledged there).",
            buckets=UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_BackendsCollector(backend_counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)
