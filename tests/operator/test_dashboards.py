"""Dashboards and alert rules: the chart ships exactly what moefleet.operator.dashboards generates, every
query names only metrics the code exports (the oracle: the real engine, gateway and operator registries,
scraped as Prometheus would), the chart renders them when enabled, promtool accepts the rules, and a real
Prometheus fed those scrapes answers every dashboard query with data."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from moefleet.operator import dashboards as D
from prometheus_client.parser import text_string_to_metric_families
from support.promql import metric_names

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "moefleet"
# Series Prometheus makes itself (not exported by any moefleet process).
PROMETHEUS_BUILTINS = {"up"}


def exported_scrapes() -> dict[str, str]:
    """The text each kind of moefleet process serves on /metrics, with every labelled family touched once."""
    from moefleet.engine.gateway.metrics import GatewayMetrics
    from moefleet.engine.server.metrics import RequestTracker, ServerMetrics, register_eplb_metrics
    from moefleet.operator import (
        autoscale_loop,
        eplb_loop,
        fleet_metrics,
        kube,
    )  # registers moefleet_operator_*
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    stats = {"num_running": 2, "num_waiting": 1, "kv_blocks_used": 10, "kv_blocks_total": 100}
    engine = ServerMetrics(lambda: stats)
    tracker = RequestTracker(engine)
    tracker.on_output(1)
    tracker.on_output(1)
    tracker.finish("stop")
    controller = SimpleNamespace(
        snapshot=SimpleNamespace(balancedness=0.7, per_layer=[0.6, 0.8]),
        layer_ids=[1, 2],
        rebalances_total=1,
        rebalance_seconds=[0.2],
        rank=0,
        routed_tokens_total=1000,
    )
    eplb = CollectorRegistry()
    register_eplb_metrics(eplb, lambda: controller)
    gateway = GatewayMetrics(lambda: {("decode", "ready"): 2})
    gateway.requests.labels("decode", "200").inc()
    gateway.upstream_seconds.labels("decode").observe(0.1)
    gateway.retries.labels("decode").inc()
    kube.API_REQUESTS.labels("GET", "pods").inc()
    eplb_loop.DECISIONS.labels("rebalanced").inc()
    autoscale_loop.DECISIONS.labels("decode", "scaled_up").inc()
    fleet_metrics.COLLECTOR.observe(
        "ns",
        "m",
        {
            "roles": {"decode": {}},
            "groups": [{"name": "m-decode-0", "role": "decode", "phase": "Ready", "restarts": 1}],
            "autoscaling": {"decode": {"current": 1, "desired": 2}},
        },
    )
    operator = "\n".join(
        line
        for line in generate_latest(REGISTRY).decode().splitlines()
        if line.startswith(("# ", "moefleet_operator_"))
    )
    return {
        "engine": engine.render().decode() + generate_latest(eplb).decode(),
        "gateway": gateway.render().decode(),
        "operator": operator + "\n",
    }


def exported_names() -> set[str]:
    names = set()
    for text in exported_scrapes().values():
        for family in text_string_to_metric_families(text):
            names.update(sample.name for sample in family.samples)
    return names


def test_committed_files_are_what_the_generator_writes(tmp_path):
    D.write(tmp_path)
    for path in sorted((tmp_path / "dashboards").glob("*.json")) + [
        tmp_path / "rules" / "moefleet.rules.yaml"
    ]:
        shipped = CHART / path.relative_to(tmp_path)
        assert shipped.read_text() == path.read_text(), (
            f"{shipped} is stale: run python -m moefleet.operator.dashboards charts/moefleet"
        )
    assert sorted(p.name for p in (CHART / "dashboards").glob("*.json")) == sorted(
        p.name for p in (tmp_path / "dashboards").glob("*.json")
    )


def test_metric_name_extraction_on_known_expressions():
    expr = (
        'histogram_quantile(0.9, sum by (le, role) (rate(moefleet_x_bucket{a="b"}[5m]))) > on (ns) foo_total'
    )
    assert metric_names(expr) == {"moefleet_x_bucket", "foo_total"}


def test_every_query_uses_only_exported_metric_names():
    exported = exported_names() | PROMETHEUS_BUILTINS
    assert "moefleet_time_to_first_token_seconds_bucket" in exported  # the oracle is a real scrape
    unknown = {
        (expr, name) for expr in D.all_queries() for name in metric_names(expr) if name not in exported
    }
    assert not unknown, f"queries use metric names nothing exports: {sorted(unknown)}"


def test_dashboards_are_well_formed():
    for uid in D.DASHBOARDS:
        board = json.loads((CHART / "dashboards" / f"{uid}.json").read_text())
        assert board["uid"] == uid and board["title"].startswith("moefleet / ")
        assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "namespace", "deployment"]
        cells = set()
        for panel in board["panels"]:
            assert panel["title"] and panel["type"] in ("timeseries", "heatmap", "stat"), panel
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
            pos = panel["gridPos"]
            mine = {
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            }
            assert not mine & cells, f"{uid}: panel {panel['title']!r} overlaps another"
            cells |= mine


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make cluster-bins)")
    result = subprocess.run(
        [promtool, "check", "rules", str(CHART / "rules" / "moefleet.rules.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


@pytest.mark.cluster
def test_chart_renders_dashboards_rules_and_monitor_only_when_enabled():
    from support import binaries

    helm = str(binaries.require()["helm"])
    base = [helm, "template", "x", str(CHART), "--kube-version", "1.34.0"]
    off = list(yaml.safe_load_all(subprocess.run(base, capture_output=True, text=True, check=True).stdout))
    assert not [d for d in off if d and d["kind"] in ("PrometheusRule", "ServiceMonitor")]
    assert not [d for d in off if d and d["kind"] == "ConfigMap"]
    on_args = [
        "--set",
        "dashboards.enabled=true",
        "--set",
        "prometheusRules.enabled=true",
        "--set",
        "serviceMonitor.enabled=true",
    ]
    on = [
        d
        for d in yaml.safe_load_all(
            subprocess.run(base + on_args, capture_output=True, text=True, check=True).stdout
        )
        if d
    ]
    maps = [d for d in on if d["kind"] == "ConfigMap"]
    assert len(maps) == len(D.DASHBOARDS)
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / name).read_text())
    (rule,) = [d for d in on if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == D.rules()
    (monitor,) = [d for d in on if d["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    lint = subprocess.run([helm, "lint", "--strict", str(CHART), *on_args], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


class _Exporter:
    """Serves the real registries' text at /metrics/<kind>."""

    def __init__(self, scrapes: dict[str, str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = scrapes.get(self.path.removeprefix("/metrics/"), "").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.cluster
def test_a_real_prometheus_answers_every_dashboard_query_and_accepts_every_rule():
    from support.prometheus import PrometheusServer

    scrapes = exported_scrapes()
    exporter = _Exporter(scrapes)
    labels = {"namespace": "ns", "deployment": "m"}
    scrape_configs = [
        {
            "job_name": kind,
            "metrics_path": f"/metrics/{kind}",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{exporter.port}"],
                    "labels": {
                        **labels,
                        **({"role": "decode", "group": "m-decode-0"} if kind == "engine" else {}),
                    },
                }
            ],
        }
        for kind in scrapes
    ]
    try:
        with PrometheusServer(scrape_configs=scrape_configs, scrape_interval="1s") as prom:
            prom.wait_for("count(up == 1) == 3", 60)
            time.sleep(4)  # a few samples for rate()
            for expr in D.all_queries():
                query = (
                    expr.replace("$__rate_interval", "1m")
                    .replace("$namespace", ".*")
                    .replace("$deployment", ".*")
                )
                body = httpx.get(f"{prom.url}/api/v1/query", params={"query": query}, timeout=10).json()
                assert body["status"] == "success", (query, body)
            empty = []
            for _, panels in D.DASHBOARDS.values():
                for panel in panels:
                    for expr, _ in panel.queries:
                        query = (
                            expr.replace("$__rate_interval", "10s")
                            .replace("$namespace", ".*")
                            .replace("$deployment", ".*")
                        )
                        if not prom.query(query):
                            empty.append((panel.title, query))
            assert not empty, f"dashboard queries without data: {empty}"
    finally:
        exporter.server.shutdown()
