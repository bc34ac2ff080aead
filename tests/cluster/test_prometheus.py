"""A real Prometheus scrapes a local prometheus_client endpoint and answers PromQL."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server
from support.cluster_fixtures import PrometheusFactory

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def test_prometheus_scrapes_local_metrics_and_answers_promql(prometheus: PrometheusFactory) -> None:
    registry = CollectorRegistry()
    requests = Counter("moefleet_probe_requests", "requests seen by the probe", ["route"], registry=registry)
    requests.labels(route="/v1/completions").inc(3)
    requests.labels(route="/health").inc(1)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_address[1]
        prom = prometheus(targets=[f"127.0.0.1:{port}"], job="probe", scrape_interval="1s")
        up = prom.wait_for('up{job="probe"} == 1', timeout_s=30)
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        got = prom.wait_for('sum(moefleet_probe_requests_total{job="probe"})', timeout_s=30)
        assert float(got[0]["value"][1]) == 4.0
        by_route = {
            s["metric"]["route"]: float(s["value"][1])
            for s in prom.query('moefleet_probe_requests_total{job="probe"}')
        }
        assert by_route == {"/v1/completions": 3.0, "/health": 1.0}
    finally:
        server.shutdown()
        thread.join(timeout=5)
