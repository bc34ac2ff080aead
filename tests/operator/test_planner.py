"""planner: which writes a reconcile makes (scaling, failures, backoff, re-forming) and the status it reports.

Each test builds the observed cluster by hand, so the expected writes are stated independently of the code.
"""

from __future__ import annotations

import pytest
from moefleet.operator import labels as L
from moefleet.operator import render
from moefleet.operator.observed import ChildState, Failure, PodState
from moefleet.operator.planner import Observed, members_hash, plan, restart_decision
from moefleet.operator.spec import RestartPolicySpec, parse
from moefleet.operator.status import timestamp
from support.operator_catalogue import merge, valid_base

NOW = 1_800_000_000.0


def make_spec(**spec_patch):
    body = merge(valid_base(), {"spec": spec_patch})
    body["metadata"].update(name="m", namespace="ns", uid="uid-1", generation=1)
    body["spec"]["model"].pop("numExperts")
    return parse(body)


def pods_for(group, nodes, ready=True, uid_prefix="", **fields):
    return [
        PodState(
            name=f"{group}-{i}",
            uid=f"{uid_prefix}{group}-{i}",
            group=group,
            ready=ready,
            phase="Running",
            **fields,
        )
        for i in range(nodes)
    ]


def converged(spec, gateway_ready=True, stale=(), gates=True):
    """Observed state where every desired child exists as rendered and every group's pods are Ready."""
    children = {}
    pods = {}
    for obj in render.render_all(spec, False):
        key = (obj["kind"], obj["metadata"]["name"])
        spec_hash = "old" if key[1] in stale else obj["metadata"]["annotations"][L.SPEC_HASH]
        ready = spec.gateway.replicas if (obj["kind"] == "Deployment" and gateway_ready) else 0
        children[key] = ChildState(key[0], key[1], spec_hash, ready, obj.get("spec", {}).get("replicas", 0))
    for role in spec.roles:
        for r in range(role.replicas):
            group = L.group_name(spec.name, role.name, r)
            pods[group] = pods_for(group, role.nodes_per_replica, group_ready_gate=gates)
    return children, pods


def settle(spec, children, pods, status=None, failures=None, now=NOW):
    """Plan, then feed the status back as the previous status (what the next reconcile sees)."""
    result = plan(
        spec, render.render_all(spec, False), Observed(children, pods, failures or {}), status or {}, now
    )
    return result


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_fresh_deployment_creates_every_child_and_reports_not_ready():
    spec = make_spec()
    result = settle(spec, {}, {})
    created = {(o["kind"], o["metadata"]["name"]) for o in result.apply}
    assert created == {(o["kind"], o["metadata"]["name"]) for o in render.render_all(spec, False)}
    assert not result.delete and not result.delete_pods
    assert cond(result.status, "Ready")["status"] == "False"
    assert [g["phase"] for g in result.status["groups"]] == ["Pending", "Pending"]


def test_converged_deployment_makes_no_writes_and_a_stable_status():
    spec = make_spec()
    children, pods = converged(spec)
    first = settle(spec, children, pods)
    assert first.writes == 0
    assert cond(first.status, "Ready")["status"] == "True"
    assert first.status["roles"]["decode"] == {
        "replicas": 1,
        "readyGroups": 1,
        "nodesPerGroup": 2,
        "readyNodes": 2,
    }
    assert first.status["groupsReady"] == {"prefill": "1/1", "decode": "1/1"}
    second = settle(spec, children, pods, status=first.status, now=NOW + 500)
    assert second.writes == 0 and second.status == first.status  # => no status write either


def test_group_ready_gate_follows_the_group():
    spec = make_spec()
    children, pods = converged(spec, gates=False)
    # prefill-0 is Ready: its pod's gate is opened. decode-0 misses a pod: its live pod's gate stays closed.
    pods["m-decode-0"] = pods["m-decode-0"][:1]
    result = settle(spec, children, pods)
    assert result.pod_gates == [("m-prefill-0-0", True)]
    # decode-0 was Ready with its gates open and loses readiness of one pod: both gates close.
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    pods["m-decode-0"][0] = PodState(
        "m-decode-0-0", "m-decode-0-0", "m-decode-0", False, "Running", group_ready_gate=True
    )
    result = settle(spec, children, pods, status=status)
    assert sorted(result.pod_gates) == [("m-decode-0-0", False), ("m-decode-0-1", False)]
    assert not result.delete_pods


def test_gateway_not_ready_keeps_ready_false():
    spec = make_spec()
    children, pods = converged(spec, gateway_ready=False)
    result = settle(spec, children, pods)
    assert cond(result.status, "Ready")["reason"] == "GatewayNotReady"


def test_scale_up_touches_only_the_new_groups_and_the_gateway_config():
    spec = make_spec()
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    bigger = make_spec(roles={"decode": {"replicas": 3}})
    result = settle(bigger, children, pods, status=status)
    touched = {(o["kind"], o["metadata"]["name"]) for o in result.apply}
    assert touched == {("ConfigMap", "m-gateway")} | {
        (kind, f"m-decode-{i}") for i in (1, 2) for kind in ("StatefulSet", "Service", "PodDisruptionBudget")
    }
    assert not result.delete and not result.delete_pods
    assert result.status["groupsReady"]["decode"] == "1/3"


def test_scale_down_deletes_only_the_removed_groups():
    spec = make_spec(roles={"decode": {"replicas": 3}})
    children, pods = converged(spec)
    smaller = make_spec(roles={"decode": {"replicas": 1}})
    result = settle(smaller, children, pods)
    deleted = {(c.kind, c.name) for c in result.delete}
    assert deleted == {
        (kind, f"m-decode-{i}") for i in (1, 2) for kind in ("StatefulSet", "Service", "PodDisruptionBudget")
    }
    assert {(o["kind"], o["metadata"]["name"]) for o in result.apply} == {("ConfigMap", "m-gateway")}
    assert not result.delete_pods
    assert [g["name"] for g in result.status["groups"]] == ["m-prefill-0", "m-decode-0"]


def test_failed_pod_restarts_exactly_its_group():
    spec = make_spec(roles={"decode": {"replicas": 2}})
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    pods["m-decode-1"][1] = PodState(
        "m-decode-1-1",
        "m-decode-1-1",
        "m-decode-1",
        False,
        "Failed",
        failure="container engine exited 1: NCCL timeout",
    )
    result = settle(spec, children, pods, status=status)
    assert result.delete_pods == {"m-decode-1": ["m-decode-1-0", "m-decode-1-1"]}
    assert not result.apply and not result.delete
    group = next(g for g in result.status["groups"] if g["name"] == "m-decode-1")
    assert group["phase"] == "Restarting" and group["restarts"] == 1
    assert "NCCL timeout" in group["lastFailure"] and group["lastRestartTime"] == timestamp(NOW)
    assert result.status["lastRestart"]["group"] == "m-decode-1"
    assert any(e.reason == "GroupRestarting" and "NCCL timeout" in e.message for e in result.events)
    assert cond(result.status, "Degraded")["reason"] == "GroupRestarting"
    # The other groups are untouched and still Ready.
    assert [g["phase"] for g in result.status["groups"] if g["name"] != "m-decode-1"] == ["Ready", "Ready"]


def test_restarted_group_is_not_restarted_again_while_old_pods_linger():
    spec = make_spec()
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    pods["m-prefill-0"][0] = PodState(
        "m-prefill-0-0", "m-prefill-0-0", "m-prefill-0", False, "Running", restart_count=1
    )
    restarted = settle(spec, children, pods, status=status)
    assert restarted.delete_pods == {"m-prefill-0": ["m-prefill-0-0"]}
    # The watch has not caught up: the deleted pod is still there, unchanged. No second restart.
    again = settle(spec, children, pods, status=restarted.status, now=NOW + 1)
    assert not again.delete_pods
    # Replacement pods come up: the group becomes Ready with the new members.
    pods["m-prefill-0"] = pods_for("m-prefill-0", 1, uid_prefix="new-")
    ready = settle(spec, children, pods, status=again.status, now=NOW + 2)
    group = ready.status["groups"][0]
    assert group["phase"] == "Ready" and group["members"] == members_hash(["new-m-prefill-0-0"])
    assert "retired" not in group


def test_replaced_pod_of_a_ready_group_restarts_the_group():
    spec = make_spec()
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    pods["m-decode-0"][1] = PodState("m-decode-0-1", "replacement", "m-decode-0", False, "Pending")
    result = settle(spec, children, pods, status=status)
    assert result.delete_pods == {"m-decode-0": ["m-decode-0-0", "m-decode-0-1"]}
    assert "disappeared or was replaced" in result.status["groups"][1]["lastFailure"]


def test_failure_seen_in_a_watch_event_restarts_the_group_once():
    spec = make_spec()
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    failure = {"m-decode-0": Failure("m-decode-0-1", "gone-uid", "container engine exited 3: OOM", NOW - 0.5)}
    first = settle(spec, children, pods, status=status, failures=failure)
    assert set(first.delete_pods) == {"m-decode-0"}
    # The same failure seen again later (memo not cleared) does not restart again.
    pods["m-decode-0"] = pods_for("m-decode-0", 2, uid_prefix="new-")
    later = settle(spec, children, pods, status=first.status, failures=failure, now=NOW + 100)
    assert not later.delete_pods


def test_backoff_then_restart_limit():
    spec = make_spec(
        restartPolicy={"backoffBase": "10s", "backoffMax": "25s", "maxRestarts": 3, "window": "1h"}
    )
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    broken = dict(pods)
    broken["m-prefill-0"] = [
        PodState("m-prefill-0-0", "x1", "m-prefill-0", False, "Running", restart_count=2)
    ]
    now = NOW
    restarts = []
    for step in range(80):
        now = NOW + step
        result = settle(spec, children, broken, status=status, now=now)
        status = result.status
        if result.delete_pods:
            restarts.append(step)
            # the replacement crashes again, with a new uid
            broken["m-prefill-0"] = [
                PodState("m-prefill-0-0", f"x{step}", "m-prefill-0", False, "Running", restart_count=1)
            ]
    # First restart at once, then after 10 s, then 20 s; then out of restarts (3 per hour).
    assert restarts == [0, 10, 30]
    group = status["groups"][0]
    assert group["phase"] == "Failed" and group["nextRestartTime"] == timestamp(NOW + 3600)
    assert cond(status, "Degraded")["reason"] == "RestartLimit"


@pytest.mark.parametrize(
    ("history", "now", "allowed", "reason", "not_before"),
    [
        ([], 100.0, True, "", None),
        ([100.0], 105.0, False, "BackOff", 130.0),  # base 30 s after one restart
        ([100.0], 130.0, True, "", None),
        ([100.0, 130.0], 150.0, False, "BackOff", 190.0),  # 60 s after two
        ([0.0, 100.0, 200.0, 300.0, 400.0], 700.0, False, "BackOff", 800.0),  # 30 * 2^4 capped at 400 s
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 7.0, False, "RestartLimit", 1001.0),  # 6 per 1000 s
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1001.5, True, "", None),  # the oldest slid out, backoff elapsed
    ],
)
def test_restart_decision(history, now, allowed, reason, not_before):
    policy = RestartPolicySpec(
        backoff_base_seconds=30, backoff_max_seconds=400, max_restarts=6, window_seconds=1000
    )
    decision = restart_decision(history, policy, now)
    assert (decision.allowed, decision.reason, decision.not_before) == (allowed, reason, not_before)


def test_image_change_reforms_one_group_at_a_time():
    old = make_spec(roles={"decode": {"replicas": 3}})
    children, pods = converged(old)
    status = settle(old, children, pods).status
    new = make_spec(image="ghcr.io/moefleet/moefleet:2", roles={"decode": {"replicas": 3}})
    order = []
    for _ in range(12):
        result = settle(new, children, pods, status=status)
        status = result.status
        assert len(result.delete_pods) <= 1, "two serving groups re-formed at once"
        for obj in result.apply:
            children[(obj["kind"], obj["metadata"]["name"])] = ChildState(
                obj["kind"], obj["metadata"]["name"], obj["metadata"]["annotations"][L.SPEC_HASH], 1, 1
            )
        for group in result.delete_pods:
            order.append(group)
            pods[group] = []  # deleted; replacements come in the next round
            break
        else:
            # recreate missing pods as Ready (the StatefulSet controller + kubelet)
            for group, group_pods in pods.items():
                if not group_pods:
                    nodes = new.role(group.split("-")[1]).nodes_per_replica
                    pods[group] = pods_for(group, nodes, uid_prefix="v2-")
    assert order == ["m-prefill-0", "m-decode-0", "m-decode-1", "m-decode-2"]
    assert cond(status, "Ready")["status"] == "True" and cond(status, "Progressing")["status"] == "False"


def test_reform_waits_while_another_group_is_not_ready_but_fixes_broken_groups_at_once():
    old = make_spec(roles={"decode": {"replicas": 2}})
    children, pods = converged(old)
    pods["m-decode-1"] = pods_for("m-decode-1", 2, ready=False)  # still starting
    new = make_spec(
        roles={"decode": {"replicas": 2, "nodesPerReplica": 4}, "prefill": {"nodesPerReplica": 1}}
    )
    result = settle(new, children, pods)
    # decode-1 is not serving: re-formed now. decode-0 serves and another group is down: it waits.
    assert set(result.delete_pods) == {"m-decode-1"}
    applied = {o["metadata"]["name"] for o in result.apply if o["kind"] == "StatefulSet"}
    assert applied == {"m-decode-1"}
    sts = next(o for o in result.apply if o["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 4
    assert cond(result.status, "Progressing")["reason"] == "Reforming"


def test_unschedulable_group_sets_degraded_with_the_schedulers_message():
    spec = make_spec()
    children, pods = converged(spec)
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pods["m-decode-0"] = [
        PodState("m-decode-0-0", "a", "m-decode-0", False, "Pending", unschedulable=message),
        PodState("m-decode-0-1", "b", "m-decode-0", False, "Pending", unschedulable=message),
    ]
    result = settle(spec, children, pods)
    degraded = cond(result.status, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InsufficientGPUs"
    assert message in degraded["message"]
    assert not result.delete_pods  # pending is not a failure


def test_condition_transition_time_moves_only_on_status_change():
    spec = make_spec()
    children, pods = converged(spec, gateway_ready=False)
    first = settle(spec, children, pods, now=NOW)
    second = settle(spec, children, pods, status=first.status, now=NOW + 60)
    assert cond(second.status, "Ready")["lastTransitionTime"] == timestamp(NOW)
    children, pods = converged(spec)
    third = settle(spec, children, pods, status=second.status, now=NOW + 120)
    assert cond(third.status, "Ready")["lastTransitionTime"] == timestamp(NOW + 120)
    assert cond(third.status, "Degraded")["lastTransitionTime"] == timestamp(NOW)


def test_invalid_spec_status_names_the_field_and_keeps_the_rest():
    from moefleet.operator.status import invalid_spec_status

    previous = {"groups": [{"name": "m-mixed-0"}], "conditions": [], "observedGeneration": 1}
    status = invalid_spec_status(previous, "spec.eplb.threshold", "1.5 must be a number in (0, 1]", 2, NOW)
    assert status["observedGeneration"] == 2 and status["groups"] == previous["groups"]
    degraded = cond(status, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert degraded["message"].startswith("spec.eplb.threshold")
    assert cond(status, "Ready")["status"] == "False"
