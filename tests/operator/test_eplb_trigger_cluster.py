"""The EPLB trigger end to end: the operator on the local control plane, a real Prometheus, fake engines.

kwok runs no containers, so each group's rank-0 engine is simulated by a local exporter (FakeEngines) whose
`moefleet_eplb_balancedness` the test sets; Prometheus scrapes it with the labels the chart's PodMonitor
relabelings would give (namespace, deployment, role, group), and the operator reaches its admin route
through the documented test-only MOEFLEET_OPERATOR_ENGINE_URL_TEMPLATE override. The fake records every
POST /admin/eplb/rebalance with its bearer token; the expected token is read from the Secret independently.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
from support.fake_engines import FakeEngineServer, Reply, gauges, operator_reading
from support.operator_cluster import condition, get_moed, moed_body, patch_spec, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

NAME = "eplb"
GROUPS = {"eplb-prefill-0": "prefill", "eplb-decode-0": "decode", "eplb-decode-1": "decode"}
WINDOW_S = 4


class FakeEngines(FakeEngineServer):
    """GET /metrics/<group>: the group's balancedness; POST /<group>/admin/eplb/rebalance: recorded."""

    def __init__(self) -> None:
        self.balancedness = dict.fromkeys(GROUPS, 0.95)
        self.posts: list[tuple[str, str]] = []  # (group, Authorization header)
        self.rebalance_delay_s = 0.0
        self.lock = threading.Lock()
        super().__init__()

    def get(self, path: str) -> Reply | None:
        group = path.removeprefix("/metrics/")
        if group not in GROUPS:
            return None
        return gauges(moefleet_eplb_balancedness=self.balancedness[group])

    def post(self, path: str, headers: Mapping[str, str]) -> Reply | None:
        group, _, rest = path.lstrip("/").partition("/")
        if rest != "admin/eplb/rebalance" or group not in GROUPS:
            return None
        with self.lock:
            self.posts.append((group, headers.get("Authorization", "")))
        time.sleep(self.rebalance_delay_s)
        body = {
            "balancedness_before": self.balancedness[group],
            "predicted_balancedness": 0.97,
            "moved_experts": 12,
        }
        return 200, json.dumps(body).encode(), "application/json"

    def posted(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.posts)


@pytest.fixture(scope="module")
def setup(operator, kube_cluster) -> Iterator[dict[str, Any]]:
    namespace = kube_cluster.create_namespace("t-eplb-trigger")
    fake = FakeEngines()
    settings = {"MOEFLEET_OPERATOR_ADMIN_TIMEOUT_SECONDS": "30"}
    with operator_reading(operator, fake, namespace, GROUPS, settings) as (prom, _):
        nowhere = {"moefleet.test/pool": "none"}  # no nodes: the groups stay Pending (the fake serves them)
        roles = {
            "prefill": {"replicas": 1, "gpusPerNode": 8, "nodeSelector": nowhere},
            "decode": {"replicas": 2, "gpusPerNode": 8, "nodeSelector": nowhere},
        }
        eplb = {"threshold": 0.8, "window": f"{WINDOW_S}s", "cooldown": "10m", "interval": "1s"}
        body = moed_body(NAME, roles, namespace, eplb=eplb)
        kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
        try:
            yield {"namespace": namespace, "fake": fake, "prom": prom, "cluster": kube_cluster}
        finally:
            kube_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _moed(s: dict[str, Any]) -> dict[str, Any]:
    return get_moed(s["cluster"], s["namespace"], NAME)


def _group_status(s: dict[str, Any], group: str) -> dict[str, Any]:
    return (
        _moed(s)
        .get("status", {})
        .get("eplb", {})
        .get("roles", {})
        .get(GROUPS[group], {})
        .get("groups", {})
        .get(group, {})
    )


def _token(s: dict[str, Any]) -> str:
    secret = s["cluster"].api_get(f"/api/v1/namespaces/{s['namespace']}/secrets/{NAME}-admin")
    return base64.b64decode(secret["data"]["token"]).decode()


def _events(s: dict[str, Any], reason: str) -> list[dict[str, Any]]:
    items = s["cluster"].api_get(f"/api/v1/namespaces/{s['namespace']}/events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == NAME and e["reason"] == reason]


def test_healthy_balancedness_is_reported_and_never_rebalanced(setup):
    s = setup
    wait_for(lambda: condition(_moed(s), "EPLBReady").get("status") == "True", 60, "EPLBReady=True")
    wait_for(lambda: _moed(s)["status"]["eplb"].get("balancedness") == 0.95, 30, "status.eplb.balancedness")
    time.sleep(WINDOW_S + 3)  # a whole window of healthy readings
    assert s["fake"].posted() == []
    # the engines' env names the Secret the operator created
    sts = s["cluster"].api_get(f"/apis/apps/v1/namespaces/{s['namespace']}/statefulsets/eplb-decode-0")
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MOEFLEET_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{NAME}-admin",
        "key": "token",
    }
    assert len(_token(s)) >= 32


def test_low_balancedness_for_the_window_rebalances_once_even_across_a_restart(setup, operator):
    s = setup
    fake: FakeEngines = s["fake"]
    fake.rebalance_delay_s = 5.0  # the operator is killed while this POST is in flight
    fake.balancedness["eplb-decode-1"] = 0.4
    wait_for(lambda: fake.posted(), WINDOW_S + 60, "a rebalance POST")
    assert fake.posted() == [("eplb-decode-1", f"Bearer {_token(s)}")]
    # the request time is in the status before the POST went out
    assert _group_status(s, "eplb-decode-1")["lastResult"] == "InProgress"
    operator.stop(kill=True)  # the fake keeps reporting 0.4: still low after the restart
    fake.rebalance_delay_s = 0.0
    operator.start()
    wait_for(lambda: condition(_moed(s), "EPLBReady").get("status") == "True", 60, "EPLBReady after restart")
    time.sleep(WINDOW_S + 4)  # low for more than a whole window, but within the cooldown
    assert [g for g, _ in fake.posted()] == ["eplb-decode-1"]
    status = _moed(s)["status"]
    assert status["eplb"]["balancedness"] == pytest.approx(0.4)  # the Balancedness column: lowest group
    assert _group_status(s, "eplb-decode-1")["lastRebalanceTime"]


def test_a_completed_rebalance_is_reported_with_an_event(setup):
    s = setup
    fake: FakeEngines = s["fake"]
    fake.balancedness["eplb-prefill-0"] = 0.5  # another role: independent of decode's in-flight record
    wait_for(
        lambda: [g for g, _ in fake.posted()].count("eplb-prefill-0") == 1, WINDOW_S + 60, "prefill POST"
    )
    wait_for(
        lambda: _group_status(s, "eplb-prefill-0").get("lastResult", "").startswith("Succeeded"),
        30,
        "the result",
    )
    entry = _group_status(s, "eplb-prefill-0")
    assert entry["rebalances"] == 1 and "0.500 -> 0.970" in entry["lastResult"]
    wait_for(lambda: _events(s, "Rebalanced"), 30, "a Rebalanced event")
    assert "eplb-prefill-0" in _events(s, "Rebalanced")[0]["message"]
    time.sleep(WINDOW_S + 2)
    assert [g for g, _ in fake.posted()].count("eplb-prefill-0") == 1  # cooldown


def test_the_operator_metrics_count_decisions_and_pass_promtool(setup, operator):
    text = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=10).text
    assert 'moefleet_operator_eplb_decisions_total{outcome="rebalanced"}' in text
    assert "_created" not in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make cluster-bins)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_group_without_series_makes_eplb_not_ready(setup):
    s = setup
    patch_spec(
        s["cluster"], s["namespace"], NAME, {"roles": {"decode": {"replicas": 3}}}
    )  # no exporter for it
    wait_for(lambda: condition(_moed(s), "EPLBReady").get("reason") == "SeriesAbsent", 60, "SeriesAbsent")
    assert "eplb-decode-2" in condition(_moed(s), "EPLBReady")["message"]
    patch_spec(s["cluster"], s["namespace"], NAME, {"roles": {"decode": {"replicas": 2}}})
    wait_for(lambda: condition(_moed(s), "EPLBReady").get("status") == "True", 60, "EPLBReady=True again")


def test_prometheus_down_sets_the_condition_and_never_rebalances_blind(setup):
    s = setup
    fake: FakeEngines = s["fake"]
    time.sleep(WINDOW_S)
    s["prom"].stop()
    fake.balancedness["eplb-decode-0"] = 0.2  # would qualify if the operator guessed
    wait_for(
        lambda: condition(_moed(s), "EPLBReady").get("reason") == "PrometheusUnavailable",
        60,
        "EPLBReady=False",
    )
    assert condition(_moed(s), "EPLBReady")["status"] == "False"
    wait_for(lambda: _events(s, "EPLBReadyFalse"), 30, "an EPLBReadyFalse event")
    time.sleep(WINDOW_S + 3)
    assert "eplb-decode-0" not in [g for g, _ in fake.posted()]
    # the core conditions written by the reconcile are still there next to EPLBReady
    types = {c["type"] for c in _moed(s)["status"]["conditions"]}
    assert {"Available", "Ready", "Progressing", "Degraded", "EPLBReady"} <= types
