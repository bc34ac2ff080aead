"""group_drain: the draining annotation (durable record), its rendering into the gateway config, the in-flight
count read from an engine's /metrics text, and when a drain may end. Expected values are worked out by hand."""

from __future__ import annotations

from moefleet.operator import group_drain as D
from moefleet.operator import render
from moefleet.operator.autoscale import decide, per_group_signal
from moefleet.operator.spec import AutoscalingSpec, parse
from moefleet.operator.status import timestamp
from support.operator_catalogue import valid_base

from moefleet.gateway_schema import GatewayConfig

NOW = 1_800_000_000.0
KEY = "moefleet.ai/draining"


def test_annotation_round_trips_and_ignores_garbage():
    meta = {"annotations": {KEY: D.encode({"m-decode-2": NOW})}}
    assert D.read(meta) == {"m-decode-2": NOW}
    assert D.read({"annotations": {KEY: "not json"}}) == {}
    assert D.read({"annotations": {KEY: '{"g": "yesterday"}'}}) == {}
    assert D.read({}) == {}
    ops = D.annotation_ops({}, {"g": NOW})
    assert ops == [
        {"op": "add", "path": "/metadata/annotations", "value": {}},
        {
            "op": "add",
            "path": "/metadata/annotations/moefleet.ai~1draining",
            "value": '{"g": "' + timestamp(NOW) + '"}',
        },
    ]
    assert D.annotation_ops(meta, {})[-1]["value"] == "{}"


def test_the_gateway_config_marks_exactly_the_draining_group():
    body = valid_base()
    body["metadata"].update(
        namespace="ns", uid="u", generation=1, annotations={KEY: D.encode({"m-decode-1": NOW})}
    )
    body["metadata"]["name"] = "m"
    body["spec"]["roles"]["decode"]["replicas"] = 2
    spec = parse(body)
    assert spec.draining_groups == {"m-decode-1"}
    config = GatewayConfig.from_dict(render.gateway_config(spec))
    flags = {g.name: g.draining for r in config.roles.values() for g in r.groups}
    assert flags["m-decode-1"] is True and not any(v for k, v in flags.items() if k != "m-decode-1")


def test_in_flight_sums_running_and_waiting_over_ranks():
    text = (
        "# TYPE moefleet_num_requests_running gauge\n"
        'moefleet_num_requests_running{dp_rank="0"} 2\nmoefleet_num_requests_running{dp_rank="1"} 1\n'
        "# TYPE moefleet_num_requests_waiting gauge\nmoefleet_num_requests_waiting 4\n"
        "# TYPE moefleet_kv_cache_usage_ratio gauge\nmoefleet_kv_cache_usage_ratio 0.5\n"
    )
    assert D.in_flight(text) == 7


def test_a_drain_ends_when_idle_after_the_grace_or_at_the_timeout():
    since = NOW - 100
    state = D.drain_state(3, True, since, NOW, grace=30, timeout=600)
    assert not state.done and "3 request(s) in flight" in state.reason
    assert D.drain_state(0, True, since, NOW, grace=30, timeout=600).done
    assert not D.drain_state(0, True, NOW - 10, NOW, grace=30, timeout=600).done  # gateway may still route
    assert not D.drain_state(None, True, since, NOW, grace=30, timeout=600).done  # Ready but unreadable
    assert D.drain_state(None, False, since, NOW, grace=30, timeout=600).done  # not Ready: serves nothing
    assert D.drain_state(5, True, NOW - 601, NOW, grace=30, timeout=600).done  # timeout wins


def test_additive_signals_count_every_group_and_scale_up_waits_for_ready_groups():
    spec = AutoscalingSpec(1, 6, "queue", 4.0, scale_down_stabilization_seconds=0.0)
    # 6 waiting on 1 group -> 2 groups; the same 6 over the 2 groups (one not serving yet) -> hold at 2
    assert decide(spec, 1, per_group_signal("queue", 6.0, 1), [], NOW, ready=1).desired == 2
    assert decide(spec, 2, per_group_signal("queue", 6.0, 2), [], NOW, ready=1).desired == 2
    assert per_group_signal("kvUsage", 0.9, 3) == 0.9
    # kvUsage 0.95 vs 0.5 would add a group, but one is still forming: hold until it is Ready
    kv = AutoscalingSpec(1, 6, "kvUsage", 0.5)
    held = decide(kv, 2, 0.95, [], NOW, ready=1)
    assert held.desired == 2 and "waiting for 1 group(s) to become Ready" in held.reason
    assert decide(kv, 2, 0.95, [], NOW, ready=2).desired == 4
