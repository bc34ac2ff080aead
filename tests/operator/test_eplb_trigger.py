"""eplb_trigger: the pure EPLB decisions (which group to rebalance, status, readiness) on hand-built series.

Every expected outcome is stated from the rules in the module docstring (window coverage, threshold,
cooldown, one group per role), with sample times written out by hand.
"""

from __future__ import annotations

import pytest
from moefleet.operator import eplb_trigger as T
from moefleet.operator.spec import SpecError, parse
from moefleet.operator.status import parse_timestamp, timestamp
from support.operator_catalogue import merge, valid_base

NOW = 1_800_000_000.0
WINDOW = 60.0  # -> step 1 s
THRESHOLD = 0.8


def make_spec(decode_replicas: int = 2, **eplb):
    body = merge(
        valid_base(),
        {
            "spec": {
                "roles": {"decode": {"replicas": decode_replicas}},
                "eplb": {"threshold": THRESHOLD, "window": "60s", "cooldown": "120s", **eplb},
            }
        },
    )
    body["metadata"].update(name="m", namespace="ns", uid="u", generation=1)
    return parse(body)


def flat(value: float, start: float = NOW - WINDOW, end: float = NOW, every: float = 1.0):
    n = int(round((end - start) / every))
    return [(start + i * every, value) for i in range(n + 1)]


def series(**groups):
    """decode_0=[...] -> {"m-decode-0": ("decode", [...])}"""
    out = {}
    for key, samples in groups.items():
        role, replica = key.rsplit("_", 1)
        out[f"m-{role}-{replica}"] = (role, samples)
    return out


def chosen(decision):
    return [v.group for v in decision.rebalance]


def test_step_is_about_sixty_points_per_window_but_at_least_a_second():
    assert T.query_step(300) == 5.0
    assert T.query_step(6) == 1.0


def test_low_for_the_whole_window_rebalances_that_group():
    spec = make_spec()
    decision = T.decide(spec, series(decode_0=flat(0.5), decode_1=flat(0.95), prefill_0=flat(0.9)), {}, NOW)
    assert chosen(decision) == ["m-decode-0"]
    assert decision.absent == ()


def test_one_healthy_sample_in_the_window_means_no_rebalance():
    samples = flat(0.5)
    samples[30] = (samples[30][0], 0.85)
    decision = T.decide(make_spec(), series(decode_0=samples), {}, NOW)
    assert chosen(decision) == []
    view = next(v for v in decision.groups if v.group == "m-decode-0")
    assert "0.850" in view.reason


def test_threshold_itself_is_not_below_threshold():
    assert chosen(T.decide(make_spec(), series(decode_0=flat(THRESHOLD)), {}, NOW)) == []


def test_partial_window_gaps_and_stale_series_never_rebalance():
    spec = make_spec()
    young = flat(0.3, start=NOW - 20)  # only 20 s of the 60 s window
    holey = [s for s in flat(0.3) if not (NOW - 40 < s[0] < NOW - 30)]  # a 10 s hole
    stale = flat(0.3, end=NOW - 10)  # stopped 10 s ago
    for samples, words in ((young, "of the 60s window"), (holey, "gap"), (stale, "no sample for 10s")):
        decision = T.decide(spec, series(decode_0=samples), {}, NOW)
        assert chosen(decision) == [], words
        assert words in next(v for v in decision.groups if v.group == "m-decode-0").reason


def test_one_group_per_role_the_lowest_and_roles_are_independent():
    spec = make_spec(decode_replicas=3)
    decision = T.decide(
        spec,
        series(decode_0=flat(0.6), decode_1=flat(0.4), decode_2=flat(0.7), prefill_0=flat(0.5)),
        {},
        NOW,
    )
    assert sorted(chosen(decision)) == ["m-decode-1", "m-prefill-0"]


def test_cooldown_and_window_after_the_last_rebalance():
    spec = make_spec()  # cooldown 120 s, window 60 s
    low = series(decode_0=flat(0.5))
    recent = {"m-decode-0": T.GroupRecord(last_rebalance_time=NOW - 100, rebalances=1)}
    assert chosen(T.decide(spec, low, recent, NOW)) == []
    past = {"m-decode-0": T.GroupRecord(last_rebalance_time=NOW - 121, rebalances=1)}
    assert chosen(T.decide(spec, low, past, NOW)) == ["m-decode-0"]
    # cooldown shorter than the window: still wait until the whole window is after the rebalance
    short = make_spec(cooldown="10s")
    mid = {"m-decode-0": T.GroupRecord(last_rebalance_time=NOW - 30)}
    view = next(v for v in T.decide(short, low, mid, NOW).groups if v.group == "m-decode-0")
    assert not view.eligible and "before the last rebalance" in view.reason


def test_an_in_progress_request_blocks_a_second_one_after_a_restart():
    """The request time is recorded before the POST: the record alone (status after a restart) blocks."""
    spec = make_spec()
    status = {
        "roles": {
            "decode": {
                "groups": {
                    "m-decode-0": {"lastRebalanceTime": timestamp(NOW - 5), "lastResult": T.IN_PROGRESS}
                }
            }
        }
    }
    records = T.records_from_status(status, parse_timestamp)
    assert records["m-decode-0"].last_result == T.IN_PROGRESS
    assert chosen(T.decide(spec, series(decode_0=flat(0.5)), records, NOW)) == []


@pytest.mark.parametrize("mode", ["engine", "off"])
def test_modes_other_than_operator_only_report(mode):
    decision = T.decide(make_spec(mode=mode), series(decode_0=flat(0.5)), {}, NOW)
    assert chosen(decision) == []
    status = T.eplb_status(make_spec(mode=mode), decision, {}, timestamp)
    assert status["mode"] == mode and status["balancedness"] == 0.5


def test_status_reports_every_group_and_the_lowest_balancedness():
    spec = make_spec()
    records = {
        "m-decode-1": T.GroupRecord(last_rebalance_time=NOW - 500, rebalances=3, last_result="Succeeded")
    }
    decision = T.decide(
        spec, series(decode_0=flat(0.9), decode_1=flat(0.85), prefill_0=flat(0.95)), records, NOW
    )
    status = T.eplb_status(spec, decision, records, timestamp)
    assert status["balancedness"] == 0.85
    assert status["roles"]["decode"]["groups"]["m-decode-1"] == {
        "balancedness": 0.85,
        "rebalances": 3,
        "lastRebalanceTime": timestamp(NOW - 500),
        "lastResult": "Succeeded",
    }
    assert status["roles"]["prefill"]["groups"]["m-prefill-0"] == {"balancedness": 0.95, "rebalances": 0}
    assert T.readiness(decision, None) == (True, "Monitoring", "3 group(s) watched")


def test_absent_series_and_prometheus_errors_make_eplb_not_ready():
    decision = T.decide(make_spec(), series(decode_0=flat(0.5)), {}, NOW)
    ok, reason, message = T.readiness(decision, None)
    assert (ok, reason) == (False, "SeriesAbsent") and "m-decode-1" in message and "m-prefill-0" in message
    ok, reason, message = T.readiness(decision, "connection refused")
    assert (ok, reason) == (False, "PrometheusUnavailable") and "connection refused" in message


def test_parse_matrix_reads_prometheus_answers_and_rejects_errors():
    payload = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {
                    "metric": {"group": "m-decode-0", "role": "decode"},
                    "values": [[NOW, "0.5"], [NOW - 1, "0.4"]],
                },
                {"metric": {"role": "decode"}, "values": [[NOW, "0.1"]]},  # no group label: ignored
            ],
        },
    }
    assert T.parse_matrix(payload) == {"m-decode-0": ("decode", [(NOW - 1, 0.4), (NOW, 0.5)])}
    with pytest.raises(ValueError, match="bad_data"):
        T.parse_matrix({"status": "error", "error": "bad_data"})


def test_mode_is_validated_naming_the_field():
    with pytest.raises(SpecError) as info:
        make_spec(mode="sometimes")
    assert info.value.field == "spec.eplb.mode"
    with pytest.raises(SpecError) as info:
        make_spec(mode="operator", enabled=False)
    assert info.value.field == "spec.eplb.mode"
    assert make_spec(enabled=False).eplb.enabled is False


def test_the_reconcile_keeps_what_the_eplb_trigger_wrote():
    """build_status/invalid_spec_status rewrite the whole status: EPLBReady and status.eplb must survive."""
    from moefleet.operator.status import build_status, invalid_spec_status

    eplb_ready = {"type": "EPLBReady", "status": "False", "reason": "PrometheusUnavailable", "message": "x"}
    eplb = {
        "enabled": True,
        "balancedness": 0.5,
        "roles": {"decode": {"groups": {"m-decode-0": {"rebalances": 2}}}},
    }
    previous = {"conditions": [eplb_ready], "eplb": eplb}
    status = build_status(make_spec(), [], {}, [], set(), None, previous, NOW)
    assert eplb_ready in status["conditions"]
    assert {c["type"] for c in status["conditions"]} == {
        "Available",
        "Ready",
        "Progressing",
        "Degraded",
        "EPLBReady",
    }
    assert status["eplb"] == eplb
    invalid = invalid_spec_status(previous, "spec.x", "bad", 2, NOW)
    assert eplb_ready in invalid["conditions"] and invalid["eplb"] == eplb
