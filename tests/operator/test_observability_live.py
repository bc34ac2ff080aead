"""The observability contract against running processes: a real `moefleet serve` (tiny MoE model, a 2-rank
group with EPLB on), a
real `moefleet gateway` in front of it and the operator on the local control plane, all scraped by a real
Prometheus. Every /metrics passes `promtool check metrics` and has no `_created` series; every dashboard panel
query returns data; every series selector of every alert rule returns data (the rules' thresholds are not
crossed on a healthy fleet, so the selectors, not the alerts, are what must exist). The oracle is what the
processes actually serve, not the registries the code declares."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from moefleet.operator import dashboards as D
from server.conftest import stop_process, wait_for_banner_url
from support.controlplane import free_port, wait_until
from support.operator_cluster import condition, get_moed, moed_body, wait_for
from support.prometheus import PrometheusServer
from support.promql import metric_names
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(600)]

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))
TOKEN = "live-observability-token"
NAME = "obs"


def _selectors(expr: str) -> list[str]:
    """Each `metric{matchers}` of a PromQL expression whose name is a metric (not a function or keyword)."""
    names = metric_names(expr)
    text = re.sub(r"\[[^\]]*\]", "", expr)
    return sorted(
        {
            m.group(0)
            for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", text)
            if m.group(1) in names
        }
    )


def _promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make cluster-bins` first", pytrace=False)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_running_serve_gateway_and_operator_answer_every_dashboard_and_rule_query(
    operator, kube_cluster, tmp_path
):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    model = tiny_model_dir("qwen3_norm_topk")
    serve_cmd = [MOEFLEET, "serve", "--model", str(model), "--port", "0", "--print-examples", "--eplb"]
    serve_cmd += ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "16"]
    serve_cmd += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    serve_cmd += ["--admin-token-file", str(token_file), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOEFLEET_ADMIN_TOKEN", None)
    engine = subprocess.Popen(serve_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    gateway = None
    prom = None
    try:
        engine_url = wait_for_banner_url(engine, timeout=240)
        gateway_port = free_port()
        gateway = subprocess.Popen(
            [
                MOEFLEET,
                "gateway",
                "--backend",
                engine_url,
                "--port",
                str(gateway_port),
                "--host",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=env,
        )
        gateway_url = f"http://127.0.0.1:{gateway_port}"

        def gateway_ready() -> bool:
            try:
                return httpx.get(gateway_url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(gateway_ready, 60, "the gateway's /health")
        operator_targets = tmp_path / "operator-targets.json"
        operator_targets.write_text("[]")
        labels = {"namespace": "ns", "deployment": "m"}
        scrape = [
            {
                "job_name": "engine",
                "static_configs": [
                    {
                        "targets": [engine_url.removeprefix("http://")],
                        "labels": {**labels, "role": "mixed", "group": "m-mixed-0", "node_rank": "0"},
                    }
                ],
            },
            {
                "job_name": "gateway",
                "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"], "labels": labels}],
            },
            {
                "job_name": "operator",
                "honor_labels": True,  # as the chart's ServiceMonitor
                # a file: the operator restarts below (on a new port) to read this Prometheus
                "file_sd_configs": [{"files": [str(operator_targets)], "refresh_interval": "1s"}],
            },
        ]
        prom = PrometheusServer(scrape_configs=scrape, scrape_interval="1s")
        prom.start()
        # The operator, reading this Prometheus, with one autoscaled MoEDeployment (no GPU nodes: its groups
        # stay Pending, which is what the groups-by-phase series then show).
        operator.restart(
            {
                "MOEFLEET_OPERATOR_PROMETHEUS_URL": prom.url,
                "MOEFLEET_OPERATOR_AUTOSCALE_INTERVAL_SECONDS": "1",
            }
        )
        operator_targets.write_text(json.dumps([{"targets": [f"127.0.0.1:{operator.metrics_port}"]}]))
        namespace = kube_cluster.create_namespace("t-obs-live")
        mixed = {
            "replicas": 1,
            "nodeSelector": {"moefleet.test/pool": "none"},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "metric": "queue", "target": 4},
        }
        body = moed_body(NAME, {"mixed": mixed}, namespace, eplb={"window": "4s", "interval": "1s"})
        kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
        moed = lambda: get_moed(kube_cluster, namespace, NAME)  # noqa: E731
        wait_for(
            lambda: condition(moed(), "AutoscalingReady").get("reason") == "SignalAbsent", 60, "autoscaler"
        )
        wait_for(lambda: condition(moed(), "EPLBReady").get("reason") == "SeriesAbsent", 60, "EPLB trigger")
        prom.wait_for("count(up == 1) == 3", 60)

        # Traffic while Prometheus scrapes: plain and streamed completions, then a rebalance.
        name = model.name
        for i in range(6):
            request = {"model": name, "prompt": [5, 6, 7 + i], "max_tokens": 4, "temperature": 0}
            request["stream"] = bool(i % 2)
            response = httpx.post(gateway_url + "/v1/completions", json=request, timeout=120)
            assert response.status_code == 200, response.text
        rebalance = httpx.post(
            engine_url + "/admin/eplb/rebalance", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
        )
        assert rebalance.status_code == 200, rebalance.text

        texts = {
            "engine": httpx.get(engine_url + "/metrics", timeout=10).text,
            "gateway": httpx.get(gateway_url + "/metrics", timeout=10).text,
            "operator": httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=10).text,
        }
        for kind, text in texts.items():
            assert "_created" not in text, kind
            _promtool(text)
        time.sleep(6)  # a few more scrapes after the traffic, for rate()

        empty = []
        for _, panels in D.DASHBOARDS.values():
            for panel in panels:
                for expr, _ in panel.queries:
                    query = expr.replace("$__rate_interval", "1m").replace("$namespace", ".*")
                    query = query.replace("$deployment", ".*")
                    if not prom.query(query):
                        empty.append((panel.title, query))
        assert not empty, f"dashboard queries without data: {empty}"
        missing = []
        for alert in D.rules()["groups"][0]["rules"]:
            for selector in _selectors(alert["expr"]):
                if not prom.query(f"count({selector})"):
                    missing.append((alert["alert"], selector))
        assert not missing, f"rule selectors without series: {missing}"
    finally:
        if prom is not None:
            prom.stop()
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=20)
        stop_process(engine)
        operator.restart()
