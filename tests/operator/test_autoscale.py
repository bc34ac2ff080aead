"""autoscale: the pure whole-group scaling decision. Expected group counts are worked out by hand from the
HPA formula ceil(groups * signal / target) with tolerance and stabilization windows."""

from __future__ import annotations

import pytest
from moefleet.operator.autoscale import decide, recommend, signal_query
from moefleet.operator.spec import AutoscalingSpec, SpecError, parse
from support.operator_catalogue import merge, valid_base

NOW = 1_800_000_000.0


def auto(**kw):
    base = dict(min_replicas=1, max_replicas=6, metric="queue", target=10.0)
    base.update(kw)
    return AutoscalingSpec(**base)


def test_recommendation_is_the_hpa_formula_in_groups_with_tolerance_and_bounds():
    spec = auto()
    assert recommend(2, 25.0, spec) == 5  # ceil(2 * 2.5)
    assert recommend(2, 10.9, spec) == 2  # within 10 %
    assert recommend(2, 11.5, spec) == 3  # ceil(2.3)
    assert recommend(4, 4.0, spec) == 2  # ceil(1.6)
    assert recommend(4, 0.0, spec) == 1  # never below minReplicas
    assert recommend(4, 100.0, spec) == 6  # never above maxReplicas
    assert recommend(0, 3.0, auto(min_replicas=0)) == 1  # from zero: one group when there is load


def test_scale_up_adds_whole_groups_at_once_when_no_up_window():
    d = decide(auto(), current=2, signal=25.0, history=[], now=NOW)
    assert (d.desired, d.drain) == (5, False)
    assert "scale up 2 -> 5" in d.reason


def test_scale_up_waits_for_its_stabilization_window():
    spec = auto(scale_up_stabilization_seconds=60.0)
    first = decide(spec, 2, 25.0, [], NOW)
    assert (first.desired, first.drain) == (5, False)  # the window holds only this recommendation
    # a spike after a calm minute: the lowest recommendation in the window (2) wins
    calm = [(NOW - 50, 2), (NOW - 20, 2)]
    d = decide(spec, 2, 25.0, calm, NOW)
    assert (d.desired, d.drain) == (2, False) and "not stable" in d.reason
    # once the calm readings are older than the window, the high one is acted on
    d = decide(spec, 2, 25.0, [(NOW - 70, 2), *d.history[-1:]], NOW + 30)
    assert d.desired == 5


def test_scale_down_drains_one_group_and_waits_for_the_down_window():
    spec = auto(scale_down_stabilization_seconds=300.0)
    busy_recently = [(NOW - 200, 4)]
    d = decide(spec, 4, 2.0, busy_recently, NOW)
    assert (d.desired, d.drain) == (4, False)  # the busy recommendation is in the 5 min window
    d = decide(spec, 4, 2.0, [(NOW - 301, 4)], NOW)
    assert (d.desired, d.drain) == (4, True) and "4 -> 3" in d.reason  # one group, after draining
    d = decide(spec, 4, 2.0, [(NOW - 301, 4)], NOW, draining=True)
    assert (d.desired, d.drain) == (4, False) and "draining" in d.reason


def test_the_first_low_reading_waits_out_the_down_window_too():
    spec = auto(scale_down_stabilization_seconds=3.0)
    # no history (a new role): one low reading, e.g. while one group's series is not scraped yet
    first = decide(spec, 2, 5.0, [], NOW)  # ceil(2 * 0.5) = 1
    assert (first.desired, first.drain) == (2, False) and "not stable" in first.reason
    assert first.history == ((NOW, 2), (NOW, 1))  # the current 2 groups count as recommended now
    d = decide(spec, 2, 10.0, first.history, NOW + 1)  # the next reading is on target: nothing happened
    assert (d.desired, d.drain) == (2, False) and "within tolerance" in d.reason
    # a dip that lasts the whole window drains one group
    d = decide(spec, 2, 5.0, first.history, NOW + 2)
    d = decide(spec, 2, 5.0, d.history, NOW + 3.5)
    assert (d.desired, d.drain) == (2, True) and "2 -> 1" in d.reason
    # a first high reading still scales up at once (no up window)
    d = decide(spec, 2, 25.0, [], NOW)
    assert (d.desired, d.drain) == (5, False)


def test_never_below_min_and_restores_bounds_without_a_signal():
    spec = auto(min_replicas=2, scale_down_stabilization_seconds=0.0)
    d = decide(spec, 2, 0.0, [], NOW)
    assert (d.desired, d.drain) == (2, False)
    d = decide(spec, 1, None, [], NOW)
    assert (d.desired, d.drain) == (2, False) and "below minReplicas" in d.reason
    d = decide(spec, 8, None, [], NOW)
    assert d.drain and "above maxReplicas" in d.reason
    d = decide(spec, 3, None, [], NOW)
    assert (d.desired, d.drain) == (3, False) and "no queue signal" in d.reason


def test_history_older_than_both_windows_is_forgotten():
    spec = auto(scale_up_stabilization_seconds=30.0, scale_down_stabilization_seconds=60.0)
    d = decide(spec, 2, 10.0, [(NOW - 61, 9), (NOW - 10, 2)], NOW)
    assert d.history == ((NOW - 10, 2), (NOW, 2))


def test_signal_queries_select_the_role():
    q = signal_query("kvUsage", "ns", "m", "decode")
    assert 'moefleet_kv_cache_usage_ratio{namespace="ns",deployment="m",role="decode"}' in q


def _role_spec(autoscaling):
    body = merge(valid_base(), {"spec": {"roles": {"decode": {"autoscaling": autoscaling}}}})
    body["metadata"].update(name="m", namespace="ns", uid="u", generation=1)
    return parse(body)


def test_spec_parses_and_validates_naming_the_field():
    spec = _role_spec({"minReplicas": 1, "maxReplicas": 4, "metric": "kvUsage", "target": 0.7})
    a = spec.role("decode").autoscaling
    assert a == AutoscalingSpec(1, 4, "kvUsage", 0.7, 0.1, 0.0, 300.0)
    assert spec.role("prefill").autoscaling is None
    for bad, field in (
        ({"minReplicas": 5, "maxReplicas": 4, "metric": "queue", "target": 1}, "minReplicas"),
        ({"minReplicas": 1, "maxReplicas": 4, "metric": "gpu", "target": 1}, "metric"),
        ({"minReplicas": 1, "maxReplicas": 4, "metric": "queue", "target": 0}, "target"),
        ({"minReplicas": 1, "maxReplicas": 4, "metric": "queue"}, "target"),
        (
            {
                "minReplicas": 1,
                "maxReplicas": 4,
                "metric": "queue",
                "target": 1,
                "scaleDownStabilization": "soon",
            },
            "scaleDownStabilization",
        ),
    ):
        with pytest.raises(SpecError) as info:
            _role_spec(bad)
        assert info.value.field == f"spec.roles.decode.autoscaling.{field}"
