"""The autoscaler's status bookkeeping (autoscale_status.py): pure functions, checked against hand-built dicts."""

from __future__ import annotations

from moefleet.operator.autoscale_status import (
    CONDITION,
    draining_entry,
    drop,
    history_of,
    raw_replicas,
    readiness,
    role_of,
    set_condition,
    set_entry,
)
from moefleet.operator.spec import parse
from support.operator_catalogue import valid_base


def _spec():
    body = valid_base()
    body["metadata"]["name"] = "m"
    return parse(body)


def test_role_of_reads_role_and_index_from_a_group_name():
    spec = _spec()
    assert role_of(spec, "m-decode-3") == ("decode", 3)
    assert role_of(spec, "m-prefill-0") == ("prefill", 0)
    assert role_of(spec, "m-decode-x") is None
    assert role_of(spec, "other-decode-1") is None


def test_set_entry_updates_one_role_and_removes_none_values():
    status = {"autoscaling": {"decode": {"pending": {"to": 2}, "current": 1}, "prefill": {"current": 4}}}
    out = set_entry("decode", pending=None, current=2, reason="r")(status)
    assert out == {"autoscaling": {"decode": {"current": 2, "reason": "r"}, "prefill": {"current": 4}}}
    assert status["autoscaling"]["decode"] == {"pending": {"to": 2}, "current": 1}  # input left alone


def test_set_condition_replaces_only_its_type():
    status = {"conditions": [{"type": "Ready", "status": "True"}, {"type": CONDITION, "status": "False"}]}
    out = set_condition({"type": CONDITION, "status": "True"})(status)
    assert out["conditions"] == [{"type": "Ready", "status": "True"}, {"type": CONDITION, "status": "True"}]


def test_drop_removes_roles_and_optionally_the_condition():
    status = {"autoscaling": {"decode": {}, "prefill": {}}, "conditions": [{"type": CONDITION}]}
    assert drop(("decode",), condition_too=False)(status) == {
        "autoscaling": {"prefill": {}},
        "conditions": [{"type": CONDITION}],
    }
    assert drop(("decode", "prefill"), condition_too=True)(status) == {"conditions": []}


def test_raw_replicas_and_history_read_back_what_was_written():
    assert raw_replicas({"spec": {"roles": {"decode": {"replicas": 3}}}}, "decode") == 3
    assert raw_replicas({"spec": {"roles": {"decode": {}}}}, "decode") == 1
    assert history_of({"history": [[1.5, 2], "junk", [2.0, 3, 4]]}) == [(1.5, 2)]


def test_readiness_names_the_cause():
    spec = _spec()
    roles = {r.name: r for r in spec.roles}
    assert readiness("down", [], roles)[:2] == (False, "PrometheusUnavailable")
    assert readiness(None, [], roles) == (True, "Monitoring", "2 role(s) scaled from Prometheus")


def test_draining_entry_records_the_group_and_one_group_less():
    out = draining_entry("decode", 3, "m-decode-2", 0.0, "idle", metric="kv")({"autoscaling": {}})
    assert out["autoscaling"]["decode"] == {
        "current": 3,
        "desired": 2,
        "draining": "m-decode-2",
        "drainStartTime": "1970-01-01T00:00:00Z",
        "reason": "idle",
        "metric": "kv",
    }
