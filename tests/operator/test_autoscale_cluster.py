"""Role autoscaling end to end: the operator on the local control plane, a real Prometheus, fake engines.

kwok runs no containers, so each group's engine is a local exporter (FakeEngines) whose waiting and running
request counts the test sets: Prometheus scrapes `/metrics/<group>` with the labels the PodMonitor's
relabelings would give, and the operator reads a draining group's in-flight count at `/<group>/metrics`
through the documented test-only MOEFLEET_OPERATOR_ENGINE_URL_TEMPLATE override. The tests run in order on
one MoEDeployment (prefill 1 group, decode 2 groups, both autoscaled on `queue` with target 4 per group).
The expected group counts are worked out by hand from ceil(groups * queue per group / target).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.fake_engines import FakeEngineServer, Reply, gauges, operator_reading
from support.operator_cluster import condition, get_moed, small_moed, wait_for, wait_ready

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

NAME = "auto"
GROUPS = {f"auto-prefill-{i}": "prefill" for i in range(3)} | {f"auto-decode-{i}": "decode" for i in range(4)}
SOLO = "solo"  # a second MoEDeployment on a one-node pool: its second group cannot get GPUs
GROUPS |= {f"solo-mixed-{i}": "mixed" for i in range(3)}
DRAINING = "moefleet.ai/draining"


class FakeEngines(FakeEngineServer):
    """Per group: `moefleet_num_requests_waiting` and `_running`, at /metrics/<group> and /<group>/metrics."""

    def __init__(self) -> None:
        self.waiting = dict.fromkeys(GROUPS, 0.0)
        self.running = dict.fromkeys(GROUPS, 0.0)
        super().__init__()

    def get(self, path: str) -> Reply | None:
        group = path.strip("/").removeprefix("metrics/").removesuffix("/metrics")
        if group not in GROUPS:
            return None
        return gauges(
            moefleet_num_requests_waiting=self.waiting[group],
            moefleet_num_requests_running=self.running[group],
        )


def _autoscaling(high: int) -> dict[str, Any]:
    return {
        "minReplicas": 1,
        "maxReplicas": high,
        "metric": "queue",
        "target": 4,
        "scaleUpStabilization": "0s",
        "scaleDownStabilization": "3s",
    }


@pytest.fixture(scope="module")
def setup(operator, kube_cluster, pool) -> Iterator[dict[str, Any]]:
    (solo_node,) = kube_cluster.create_gpu_nodes(1, prefix="autoscale-solo")
    kube_cluster.kubectl("label", "node", solo_node, "moefleet.test/pool=autoscale-solo", "--overwrite")
    namespace = kube_cluster.create_namespace("t-autoscale")
    fake = FakeEngines()
    fake.waiting.update({"auto-prefill-0": 4.0, "auto-decode-0": 4.0, "auto-decode-1": 4.0})  # on target
    settings = {
        "MOEFLEET_OPERATOR_AUTOSCALE_INTERVAL_SECONDS": "1",
        "MOEFLEET_OPERATOR_DRAIN_GRACE_SECONDS": "2",
        "MOEFLEET_OPERATOR_DRAIN_TIMEOUT_SECONDS": "120",
    }
    with operator_reading(operator, fake, namespace, GROUPS, settings) as (prom, env):
        roles = {
            "prefill": {"replicas": 1, "autoscaling": _autoscaling(3)},
            "decode": {"replicas": 2, "autoscaling": _autoscaling(4)},
        }
        body = small_moed(NAME, roles, namespace, eplb={"mode": "off", "enabled": False})
        kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
        try:
            yield {"namespace": namespace, "fake": fake, "prom": prom, "cluster": kube_cluster, "env": env}
        finally:
            kube_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _moed(s: dict[str, Any]) -> dict[str, Any]:
    return get_moed(s["cluster"], s["namespace"], NAME)


def _replicas(s: dict[str, Any], role: str) -> int:
    return _moed(s)["spec"]["roles"][role]["replicas"]


def _entry(s: dict[str, Any], role: str) -> dict[str, Any]:
    return _moed(s).get("status", {}).get("autoscaling", {}).get(role, {})


def _draining(s: dict[str, Any]) -> dict[str, str]:
    return json.loads(_moed(s)["metadata"].get("annotations", {}).get(DRAINING) or "{}")


def _events(s: dict[str, Any], reason: str, role: str) -> list[dict[str, Any]]:
    items = s["cluster"].api_get(f"/api/v1/namespaces/{s['namespace']}/events")["items"]
    return [
        e
        for e in items
        if e["involvedObject"]["name"] == NAME
        and e["reason"] == reason
        and e["message"].startswith(f"{role}:")
    ]


def _statefulsets(s: dict[str, Any]) -> list[str]:
    items = s["cluster"].api_get(f"/apis/apps/v1/namespaces/{s['namespace']}/statefulsets")["items"]
    return sorted(o["metadata"]["name"] for o in items if not o["metadata"].get("deletionTimestamp"))


def _gateway_groups(s: dict[str, Any], role: str) -> dict[str, bool]:
    cm = s["cluster"].api_get(f"/api/v1/namespaces/{s['namespace']}/configmaps/{NAME}-gateway")
    config = json.loads(next(iter(cm["data"].values())))
    return {g["name"]: g.get("draining", False) for g in config["roles"][role]["groups"]}


def test_on_target_load_holds_and_reports(setup):
    s = setup
    wait_ready(s["cluster"], s["namespace"], NAME)
    wait_for(lambda: condition(_moed(s), "AutoscalingReady").get("status") == "True", 60, "AutoscalingReady")
    wait_for(lambda: "within tolerance" in _entry(s, "decode").get("reason", ""), 90, "a hold reason")
    entry = _entry(s, "decode")
    assert (entry["current"], entry["desired"], entry["signal"]) == (2, 2, 4.0)
    assert (_replicas(s, "prefill"), _replicas(s, "decode")) == (1, 2)


def test_queue_above_target_adds_exactly_one_group_even_when_killed_mid_decision(setup, operator):
    s = setup
    operator.restart({**s["env"], "MOEFLEET_OPERATOR_FAULT_EXIT_AFTER": "autoscale-intent"})
    s["fake"].waiting["auto-prefill-0"] = 6.0  # 6 per group vs 4 -> ceil(1 * 1.5) = 2 groups
    # the operator records the intent, then dies before patching replicas
    wait_for(lambda: operator.proc is not None and operator.proc.poll() is not None, 60, "the injected exit")
    pending = _entry(s, "prefill").get("pending")
    assert pending is not None and (pending["from"], pending["to"]) == (1, 2)
    assert _replicas(s, "prefill") == 1
    operator.restart(dict(s["env"]))
    wait_for(lambda: _replicas(s, "prefill") == 2, 60, "prefill scaled to 2 groups")
    wait_for(lambda: "pending" not in _entry(s, "prefill"), 30, "the intent cleared")
    wait_ready(s["cluster"], s["namespace"], NAME)
    time.sleep(5)  # the same 6 waiting over 2 groups is 3 per group: ceil(2 * 0.75) = 2, hold
    assert _replicas(s, "prefill") == 2
    (event,) = _events(s, "ScaledUp", "prefill")
    assert "scale up 1 -> 2" in event["message"]
    entry = _entry(s, "prefill")
    assert entry["current"] == 2 and entry["lastScaleTime"] and "holding 2" in entry["reason"]
    assert _replicas(s, "decode") == 2 and not _events(s, "ScaledUp", "decode")  # roles are independent
    assert "auto-prefill-1" in _statefulsets(s)


def test_a_hand_edit_of_replicas_during_a_decision_wins(setup, operator):
    s = setup
    operator.restart({**s["env"], "MOEFLEET_OPERATOR_FAULT_EXIT_AFTER": "autoscale-intent"})
    s["fake"].waiting["auto-prefill-0"] = 10.0  # 5 per group over 2 -> ceil(2 * 1.25) = 3
    wait_for(lambda: operator.proc is not None and operator.proc.poll() is not None, 60, "the injected exit")
    assert (_entry(s, "prefill")["pending"]["from"], _entry(s, "prefill")["pending"]["to"]) == (2, 3)
    patch = {"spec": {"roles": {"prefill": {"replicas": 1}}}}
    s["cluster"].kubectl("patch", "moed", NAME, "-n", s["namespace"], "--type=merge", "-p", json.dumps(patch))
    s["fake"].waiting["auto-prefill-0"] = 4.0  # on target for the one group the user wants
    operator.restart(dict(s["env"]))
    wait_for(lambda: _events(s, "ScaleAbandoned", "prefill"), 60, "a ScaleAbandoned Event")
    assert "replicas changed to 1" in _events(s, "ScaleAbandoned", "prefill")[0]["message"]
    time.sleep(4)
    assert _replicas(s, "prefill") == 1 and "pending" not in _entry(s, "prefill")
    assert len(_events(s, "ScaledUp", "prefill")) == 1  # only the earlier scale up


def test_queue_below_target_drains_then_removes_one_group_across_a_restart(setup, operator):
    s = setup
    fake: FakeEngines = s["fake"]
    fake.running["auto-decode-1"] = 2.0  # in flight: the drain must wait for these
    fake.waiting.update({"auto-decode-0": 1.0, "auto-decode-1": 1.0})  # 1 per group -> ceil(2/4) = 1
    wait_for(lambda: "auto-decode-1" in _draining(s), 60, "the drain of auto-decode-1")
    since = _draining(s)["auto-decode-1"]
    wait_for(lambda: _gateway_groups(s, "decode").get("auto-decode-1") is True, 30, "gateway config draining")
    assert _gateway_groups(s, "decode")["auto-decode-0"] is False
    assert len(_events(s, "DrainStarted", "decode")) == 1
    operator.stop(kill=True)
    operator.start()
    time.sleep(5)  # idle long past the 2 s grace, but 2 requests are still running
    assert _replicas(s, "decode") == 2 and _draining(s) == {"auto-decode-1": since}
    assert "3 request(s) in flight" in _entry(s, "decode").get("reason", "")  # 2 running + 1 waiting
    fake.running["auto-decode-1"] = fake.waiting["auto-decode-1"] = 0.0
    wait_for(lambda: _replicas(s, "decode") == 1, 60, "decode scaled to 1 group")
    wait_for(lambda: "auto-decode-1" not in _statefulsets(s), 60, "auto-decode-1 deleted")
    assert _draining(s) == {}
    wait_for(lambda: list(_gateway_groups(s, "decode")) == ["auto-decode-0"], 30, "gateway config updated")
    assert len(_events(s, "ScaledDown", "decode")) == 1 and len(_events(s, "DrainStarted", "decode")) == 1
    assert _entry(s, "decode")["current"] == 1


def test_never_below_min_replicas(setup):
    s = setup
    s["fake"].waiting["auto-decode-0"] = 0.0  # no load at all: the formula says 0 groups, minReplicas 1
    time.sleep(6)  # twice the 3 s scale-down window
    assert _replicas(s, "decode") == 1 and _draining(s) == {}
    assert len(_events(s, "DrainStarted", "decode")) == 1  # still only the earlier one


def test_a_group_pending_for_gpus_is_degraded_and_holds_further_scale_up(setup):
    s = setup
    fake: FakeEngines = s["fake"]
    fake.waiting["solo-mixed-0"] = 8.0  # 8 per group vs 4 -> 2 groups; the pool has GPUs for one
    mixed = {
        "replicas": 1,
        "nodeSelector": {"moefleet.test/pool": "autoscale-solo"},
        "autoscaling": {**_autoscaling(3), "scaleDownStabilization": "10m"},
    }
    body = small_moed(SOLO, {"mixed": mixed}, s["namespace"], eplb={"mode": "off", "enabled": False})
    s["cluster"].kubectl("apply", "-f", "-", input=json.dumps(body))
    solo = lambda: get_moed(s["cluster"], s["namespace"], SOLO)  # noqa: E731
    wait_for(lambda: solo()["spec"]["roles"]["mixed"]["replicas"] == 2, 90, "solo scaled to 2 groups")
    wait_for(lambda: condition(solo(), "Degraded").get("reason") == "InsufficientGPUs", 60, "Degraded")
    assert "solo-mixed-1" in condition(solo(), "Degraded")["message"]
    fake.waiting["solo-mixed-0"] = 24.0  # 12 per group: ceil(2 * 3) = 6, capped at 3, but a group is pending
    wait_for(
        lambda: (
            "waiting for 1 group(s) to become Ready"
            in solo().get("status", {}).get("autoscaling", {}).get("mixed", {}).get("reason", "")
        ),
        30,
        "the hold reason",
    )
    time.sleep(3)
    assert solo()["spec"]["roles"]["mixed"]["replicas"] == 2
    s["cluster"].kubectl("delete", "moed", SOLO, "-n", s["namespace"], "--wait=false")


def test_prometheus_down_sets_the_condition_and_changes_nothing(setup):
    s = setup
    s["prom"].stop()
    s["fake"].waiting["auto-prefill-0"] = 40.0  # would scale prefill to its maximum if the operator guessed
    wait_for(
        lambda: condition(_moed(s), "AutoscalingReady").get("reason") == "PrometheusUnavailable",
        60,
        "AutoscalingReady=False PrometheusUnavailable",
    )
    wait_for(lambda: _events(s, "AutoscalingReadyFalse", "PrometheusUnavailable"), 30, "an Event")
    time.sleep(4)
    assert (_replicas(s, "prefill"), _replicas(s, "decode")) == (1, 1)
    assert "Prometheus cannot be read" in _entry(s, "prefill")["reason"]
