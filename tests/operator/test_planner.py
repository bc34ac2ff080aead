"""planner: which writes a reconcile makes (scaling, failures, backoff, re-forming) and the status it reports.

Each test builds the observed cluster by hand, so the expected writes are stated independently of the code.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
from moefleet.operator import labels as L
from moefleet.operator import render
from moefleet.operator.drift import drifted_fields
from moefleet.operator.observed import Failure, PodState, child_state, node_ready, pod_state
from moefleet.operator.planner import Observed, members_hash, plan, restart_decision
from moefleet.operator.spec import RestartPolicySpec, parse
from moefleet.operator.status import condition_events, invalid_spec_status, timestamp, write_due
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


def as_returned_by_the_api(obj):
    """What a GET returns for an applied object: server defaults added, quantities as strings, zero values
    omitted (written from the API's documented behaviour, independently of drift.py)."""
    body = copy.deepcopy(obj)
    body["metadata"].update(generation=1, resourceVersion="100", uid="child-uid")
    spec = body.get("spec", {})
    if body["kind"] == "Service":
        spec.setdefault("type", "ClusterIP")
        spec["ipFamilies"] = ["IPv4"]
        if spec.get("publishNotReadyAddresses") is False:
            del spec["publishNotReadyAddresses"]
    template = spec.get("template", {}).get("spec")
    if template is not None:
        template.update(restartPolicy="Always", dnsPolicy="ClusterFirst", schedulerName="default-scheduler")
        if template.get("enableServiceLinks") is False:
            pass  # a *bool pointer: false is kept
        for container in template["containers"]:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            for key in ("limits", "requests"):
                for name, value in container.get("resources", {}).get(key, {}).items():
                    container["resources"][key][name] = str(value)
            for probe in ("startupProbe", "readinessProbe"):
                if probe in container:
                    container[probe].update(timeoutSeconds=1, successThreshold=1)
                    container[probe]["httpGet"].setdefault("scheme", "HTTP")
            for env in container.get("env", []):
                if "fieldRef" in env.get("valueFrom", {}):
                    env["valueFrom"]["fieldRef"].setdefault("apiVersion", "v1")
    if body["kind"] == "StatefulSet":
        spec.setdefault("revisionHistoryLimit", 10)
        body["status"] = {"observedGeneration": 1, "updateRevision": f"{body['metadata']['name']}-rev1"}
    return body


def child(obj, api_body=None, ready=0):
    """The observed state of an applied child, as the index builds it from the API's body."""
    state = child_state(api_body or as_returned_by_the_api(obj))
    return dataclasses.replace(state, ready_replicas=ready)


def converged(spec, gateway_ready=True, stale=(), gates=True):
    """Observed state where every desired child exists as rendered and every group's pods are Ready."""
    children = {}
    pods = {}
    for obj in render.render_all(spec, False):
        key = (obj["kind"], obj["metadata"]["name"])
        ready = spec.gateway.replicas if (obj["kind"] == "Deployment" and gateway_ready) else 0
        children[key] = child(obj, ready=ready)
        if key[1] in stale:
            children[key] = dataclasses.replace(children[key], spec_hash="old")
    for role in spec.roles:
        for r in range(role.replicas):
            group = L.group_name(spec.name, role.name, r)
            pods[group] = pods_for(
                group,
                role.nodes_per_replica,
                group_ready_gate=gates,
                gate_by_operator=gates,
                revision=f"{group}-rev1",
            )
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
        "updatedGroups": 1,
        "minReadyGroups": 1,
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


def test_a_gate_opened_by_someone_else_is_taken_over():
    """kwok's fake kubelet (or anyone) opening the gate is not the operator's decision: it writes its own."""
    spec = make_spec()
    children, pods = converged(spec)
    pods["m-prefill-0"] = pods_for(
        "m-prefill-0", 1, group_ready_gate=True, gate_by_operator=False, revision="m-prefill-0-rev1"
    )
    assert settle(spec, children, pods).pod_gates == [("m-prefill-0-0", True)]
    pods["m-decode-0"][1] = PodState(  # its group is not Ready: a foreign open gate is closed
        "m-decode-0-1", "m-decode-0-1", "m-decode-0", False, "Running", group_ready_gate=True
    )
    gates = settle(spec, children, pods).pod_gates
    assert sorted(gates) == [("m-decode-0-0", False), ("m-decode-0-1", False), ("m-prefill-0-0", True)]


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
        (kind, f"m-decode-{i}") for i in (1, 2) for kind in ("StatefulSet", "Service", "NetworkPolicy")
    }
    assert not result.delete and not result.delete_pods
    assert result.status["groupsReady"]["decode"] == "1/3"


def test_scale_down_deletes_only_the_removed_groups():
    spec = make_spec(roles={"decode": {"replicas": 3}})
    children, pods = converged(spec)
    smaller = make_spec(roles={"decode": {"replicas": 1}})
    result = settle(smaller, children, pods)
    deleted = {(c.kind, c.name) for c in result.delete}
    kinds = ("StatefulSet", "Service", "NetworkPolicy")
    assert deleted == {(kind, f"m-decode-{i}") for i in (1, 2) for kind in kinds}
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
        for obj in result.apply:  # the StatefulSet controller's new revision for the new template
            body = as_returned_by_the_api(obj)
            if obj["kind"] == "StatefulSet":
                body["status"]["updateRevision"] = f"{obj['metadata']['name']}-rev2"
            ready = 1 if obj["kind"] == "Deployment" else 0  # the new gateway pod comes up at once
            children[(obj["kind"], obj["metadata"]["name"])] = child(obj, body, ready=ready)
        for group in result.delete_pods:
            order.append(group)
            pods[group] = []  # deleted; replacements come in the next round
            break
        else:
            # recreate missing pods as Ready (the StatefulSet controller + kubelet)
            for group, group_pods in pods.items():
                if not group_pods:
                    nodes = new.role(group.split("-")[1]).nodes_per_replica
                    pods[group] = pods_for(group, nodes, uid_prefix="v2-", revision=f"{group}-rev2")
    assert order == ["m-prefill-0", "m-decode-0", "m-decode-1", "m-decode-2"]
    assert cond(status, "Ready")["status"] == "True", status["conditions"]
    assert cond(status, "Progressing")["status"] == "False"


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


# -- conditions as kubectl users read them (Available / Ready / Progressing / Degraded) ----------------------
def failed_pod(group, index):
    name = f"{group}-{index}"
    return PodState(name, name, group, False, "Failed", failure="container engine exited 1: NCCL timeout")


def test_one_restarting_group_of_four_keeps_the_deployment_available():
    spec = make_spec(roles={"decode": {"replicas": 4}})
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    assert [cond(status, t)["status"] for t in ("Available", "Ready", "Progressing", "Degraded")] == [
        "True", "True", "False", "False",
    ]  # fmt: skip
    pods["m-decode-2"][0] = failed_pod("m-decode-2", 0)
    result = settle(spec, children, pods, status=status, now=NOW + 5)
    available, ready = cond(result.status, "Available"), cond(result.status, "Ready")
    assert (available["status"], available["reason"]) == ("True", "MinimumGroupsAvailable")
    assert "decode 3/4" in available["message"]
    assert available["lastTransitionTime"] == timestamp(NOW)  # it never went away
    assert (ready["status"], ready["reason"]) == ("False", "GroupsNotReady")
    assert cond(result.status, "Progressing")["status"] == "True"
    assert cond(result.status, "Degraded")["reason"] == "GroupRestarting"
    # One decision, one condition Event (a Warning: Degraded), naming every change.
    events = condition_events(status, result.status)
    assert len(events) == 1 and events[0].type == "Warning" and events[0].reason == "DegradedTrue"
    assert "Degraded=True GroupRestarting" in events[0].message


def test_two_groups_down_of_four_is_unavailable_and_names_the_role():
    spec = make_spec(roles={"decode": {"replicas": 4}})
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    pods["m-decode-1"][1] = failed_pod("m-decode-1", 1)
    pods["m-decode-3"][0] = failed_pod("m-decode-3", 0)
    result = settle(spec, children, pods, status=status, now=NOW + 5)
    available = cond(result.status, "Available")
    assert (available["status"], available["reason"]) == ("False", "MinimumGroupsUnavailable")
    assert available["message"] == "role decode: 2/4 group(s) Ready (needs 3)"
    assert result.status["roles"]["decode"]["minReadyGroups"] == 3
    [event] = condition_events(status, result.status)
    assert event.type == "Warning" and event.reason == "AvailableFalse"


def test_single_group_role_is_unavailable_while_it_restarts():
    spec = make_spec()
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    pods["m-prefill-0"][0] = failed_pod("m-prefill-0", 0)
    result = settle(spec, children, pods, status=status, now=NOW + 5)
    assert cond(result.status, "Available")["message"] == "role prefill: 0/1 group(s) Ready (needs 1)"


def test_progressing_is_false_and_stalled_when_only_unschedulable_groups_remain():
    spec = make_spec()
    children, pods = converged(spec)
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pods["m-decode-0"] = [
        PodState(f"m-decode-0-{i}", f"u{i}", "m-decode-0", False, "Pending", unschedulable=message)
        for i in range(2)
    ]
    progressing = cond(settle(spec, children, pods).status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "Stalled")
    assert "m-decode-0 cannot be scheduled" in progressing["message"]
    pods["m-prefill-0"] = pods_for("m-prefill-0", 1, ready=False, revision="m-prefill-0-rev1")  # starting
    assert cond(settle(spec, children, pods).status, "Progressing")["reason"] == "GroupsStarting"


def test_fresh_deployment_posts_no_created_event_and_a_scale_up_posts_one_not_one_per_child():
    spec = make_spec(roles={"decode": {"replicas": 3}})
    result = settle(spec, {}, {})
    assert result.apply and result.events == []  # creating its children is what creating it means
    # Later creations are news: a scale up posts ONE Created Event naming every new object.
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    bigger = make_spec(roles={"decode": {"replicas": 5}})
    result = settle(bigger, children, pods, status=status)
    created = [e for e in result.events if e.reason == "Created"]
    assert len(created) == 1
    new = [o for o in result.apply if (o["kind"], o["metadata"]["name"]) not in children]
    assert created[0].message.startswith(f"Created {len(new)} object(s): ")
    assert "StatefulSet m-decode-4 (group of 2 nodes)" in created[0].message


# -- drift: hand edits of fields the operator owns are reverted ----------------------------------------------
def test_hand_edited_statefulset_env_is_reapplied_with_an_event():
    spec = make_spec()
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    desired = next(
        o
        for o in render.render_all(spec, False)
        if (o["kind"], o["metadata"]["name"]) == ("StatefulSet", "m-decode-0")
    )
    edited = as_returned_by_the_api(desired)  # kubectl edit: one env value changed, the hash annotation kept
    env = edited["spec"]["template"]["spec"]["containers"][0]["env"]
    env[-1] = {"name": env[-1]["name"], "value": "hand-edited"}
    children[("StatefulSet", "m-decode-0")] = child(desired, edited)
    result = settle(spec, children, pods, status=status)
    assert [o["metadata"]["name"] for o in result.apply] == ["m-decode-0"]
    assert result.apply[0] == desired and not result.delete_pods  # reverted, the group keeps running
    [event] = result.events
    assert (event.type, event.reason) == ("Warning", "DriftCorrected")
    assert f"StatefulSet m-decode-0 (spec.template.spec.containers[0].env[{len(env) - 1}]" in event.message


@pytest.mark.parametrize(
    ("kind", "name", "edit"),
    [
        ("StatefulSet", "m-prefill-0", lambda b: b["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "EXTRA", "value": "1"})),
        ("Service", "m-ready", lambda b: b["spec"]["selector"].update({L.POD_INDEX: "1"})),
        ("PodDisruptionBudget", "m-decode", lambda b: b["spec"].update(maxUnavailable=5)),
        ("ConfigMap", "m-gateway", lambda b: b["data"].update({"config.json": "{}"})),
        ("Deployment", "m-gateway", lambda b: b["metadata"]["labels"].pop("app.kubernetes.io/managed-by")),
    ],
)  # fmt: skip
def test_drift_on_every_kind_is_detected(kind, name, edit):
    spec = make_spec()
    children, pods = converged(spec)
    desired = next(
        o for o in render.render_all(spec, False) if (o["kind"], o["metadata"]["name"]) == (kind, name)
    )
    body = as_returned_by_the_api(desired)
    edit(body)
    children[(kind, name)] = child(desired, body, ready=children[(kind, name)].ready_replicas)
    result = settle(spec, children, pods)
    assert [(o["kind"], o["metadata"]["name"]) for o in result.apply] == [(kind, name)]
    assert [e.reason for e in result.events] == ["DriftCorrected"]


def test_server_defaults_and_quantity_spellings_are_not_drift():
    spec = make_spec()
    desired = next(
        o
        for o in render.render_all(spec, False)
        if (o["kind"], o["metadata"]["name"]) == ("StatefulSet", "m-decode-0")
    )
    body = as_returned_by_the_api(desired)
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["resources"].setdefault("requests", {})
    desired["spec"]["template"]["spec"]["containers"][0]["resources"].setdefault("requests", {})["cpu"] = (
        "0.5"
    )
    container["resources"]["requests"]["cpu"] = "500m"
    assert drifted_fields(desired, child(desired, body).live) == []
    container["resources"]["requests"]["cpu"] = "600m"
    assert drifted_fields(desired, child(desired, body).live) == [
        "spec.template.spec.containers[0].resources.requests.cpu"
    ]


# -- rollouts measured from pods and their StatefulSet's update revision -------------------------------------
def test_pods_on_an_older_revision_are_reformed_without_reapplying_the_statefulset():
    """The operator applied the new StatefulSet, then stopped before deleting the pods: the hash is current,
    but the pods' controller-revision-hash is not the StatefulSet's updateRevision."""
    spec = make_spec()
    children, pods = converged(spec)
    status = settle(spec, children, pods).status
    pods["m-decode-0"] = pods_for(
        "m-decode-0", 2, revision="m-decode-0-rev0", group_ready_gate=True, gate_by_operator=True
    )
    result = settle(spec, children, pods, status=status)
    assert result.delete_pods == {"m-decode-0": ["m-decode-0-0", "m-decode-0-1"]}
    assert not result.apply
    assert cond(result.status, "Ready")["status"] == "False"
    assert result.status["roles"]["decode"]["updatedGroups"] == 0
    assert [e.reason for e in result.events] == ["ReformingGroup"]


def test_a_statefulset_its_controller_has_not_observed_is_not_counted_as_current():
    spec = make_spec()
    children, pods = converged(spec)
    state = children[("StatefulSet", "m-decode-0")]
    children[("StatefulSet", "m-decode-0")] = dataclasses.replace(state, generation=2, observed_generation=1)
    result = settle(spec, children, pods)
    assert not result.delete_pods and not result.apply  # nothing to do but wait for the controller
    ready, progressing = cond(result.status, "Ready"), cond(result.status, "Progressing")
    assert ready["status"] == "False" and (progressing["status"], progressing["reason"]) == (
        "True", "RolloutPending",
    )  # fmt: skip
    assert cond(result.status, "Available")["status"] == "True"


def test_first_status_posts_no_condition_event_unless_degraded():
    spec = make_spec()
    first = settle(spec, {}, {}).status
    assert condition_events({}, first) == []
    invalid = invalid_spec_status({}, "spec.roles", "must not be empty", 1, NOW)
    [event] = condition_events({}, invalid)
    assert (event.type, event.reason) == ("Warning", "DegradedTrue") and "spec.roles" in event.message


def test_first_convergence_is_not_an_event_but_a_recovery_is():
    spec = make_spec()
    starting = settle(spec, {}, {}).status
    assert cond(starting, "Available")["reason"] == "Starting"
    children, pods = converged(spec)
    serving = settle(spec, children, pods, status=starting).status
    assert cond(serving, "Available")["status"] == "True" and condition_events(starting, serving) == []
    pods["m-prefill-0"][0] = failed_pod("m-prefill-0", 0)
    broken = settle(spec, children, pods, status=serving, now=NOW + 5).status
    assert cond(broken, "Available")["reason"] == "MinimumGroupsUnavailable"  # no longer "Starting"
    assert [e.reason for e in condition_events(serving, broken)] == ["AvailableFalse"]
    pods["m-prefill-0"] = pods_for(
        "m-prefill-0",
        1,
        uid_prefix="new-",
        gate_by_operator=True,
        group_ready_gate=True,
        revision="m-prefill-0-rev1",
    )
    recovered = settle(spec, children, pods, status=broken, now=NOW + 60).status
    [event] = condition_events(broken, recovered)
    assert (event.type, event.reason) == ("Normal", "AvailableTrue") and "Degraded=False" in event.message


# -- never stuck (issue 13): NotReady nodes, pods stuck Terminating, owner/uid-checked deletes, FailedCreate,
# the start-up grace


def run(spec, children, pods, status=None, now=NOW, **observed):
    return plan(spec, render.render_all(spec, False), Observed(children, pods, **observed), status or {}, now)


def steady(spec):
    """A converged deployment and its status after one pass (every group Ready, members recorded)."""
    children, pods = converged(spec)
    for group, members in pods.items():
        pods[group] = [dataclasses.replace(p, node=f"node-{p.name}", owner=group) for p in members]
    status = run(spec, children, pods).status
    assert [g["phase"] for g in status["groups"]] == ["Ready", "Ready"]
    return children, pods, status


def test_a_pod_on_a_not_ready_node_makes_its_group_not_ready_at_once():
    spec = make_spec()
    children, pods, status = steady(spec)
    nodes = {p.node: True for members in pods.values() for p in members}
    nodes["node-m-decode-0-1"] = False
    result = run(spec, children, pods, status, node_ready=nodes)
    phases = {g["name"]: g["phase"] for g in result.status["groups"]}
    assert phases == {"m-prefill-0": "Ready", "m-decode-0": "Forming"}
    assert cond(result.status, "Ready")["status"] == "False"
    degraded = cond(result.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "NodeNotReady")
    assert degraded["message"] == "group m-decode-0: node node-m-decode-0-1 of pod m-decode-0-1 is NotReady"
    # Its pods' gates close; nothing is deleted or restarted (the pods may come back with the node).
    assert sorted(result.pod_gates) == [("m-decode-0-0", False), ("m-decode-0-1", False)]
    assert not result.delete_pods and not result.force_delete
    # A node that vanished from the cluster counts as NotReady too.
    del nodes["node-m-decode-0-1"]
    assert (
        cond(run(spec, children, pods, status, node_ready=nodes).status, "Degraded")["reason"]
        == "NodeNotReady"
    )


def _stuck(pod: PodState, deadline: float) -> PodState:
    return dataclasses.replace(pod, deleting=True, deletion_deadline=deadline)


def test_a_pod_stuck_terminating_on_a_not_ready_node_is_force_deleted_after_the_timeout_only():
    spec = make_spec()
    children, pods, status = steady(spec)
    nodes = {p.node: True for members in pods.values() for p in members}
    victim = pods["m-decode-0"][1]
    pods["m-decode-0"][1] = _stuck(victim, deadline=NOW - 299)
    nodes[victim.node] = False
    early = run(spec, children, pods, status, node_ready=nodes, now=NOW)
    assert not early.force_delete  # 299 s past its deadline < 300 s
    late = run(spec, children, pods, status, node_ready=nodes, now=NOW + 1)
    assert late.force_delete == [(victim.name, victim.uid)]
    [event] = [e for e in late.events if e.reason == "ForceDeletedPods"]
    assert event.type == "Warning" and f"{victim.name} (node {victim.node})" in event.message
    # The same pod on a Ready node is only slow to terminate: never force-deleted (two copies could run).
    nodes[victim.node] = True
    assert not run(spec, children, pods, status, node_ready=nodes, now=NOW + 1000).force_delete
    # A pod the group's StatefulSet does not own (same labels, another controller) is never touched.
    nodes[victim.node] = False
    pods["m-decode-0"][1] = dataclasses.replace(pods["m-decode-0"][1], owner="someone-else")
    assert not run(spec, children, pods, status, node_ready=nodes, now=NOW + 1000).force_delete


def test_group_restart_deletes_only_pods_its_statefulset_owns_each_with_its_uid():
    spec = make_spec()
    children, pods, status = steady(spec)
    decode = pods["m-decode-0"]
    decode[0] = dataclasses.replace(decode[0], phase="Failed", failure="container engine exited 1 (Error)")
    decode[1] = dataclasses.replace(decode[1], owner="")  # labelled like ours, no StatefulSet owner
    result = run(spec, children, pods, status)
    assert result.delete_pods == {"m-decode-0": ["m-decode-0-0"]}
    assert result.pod_uids == {"m-decode-0-0": decode[0].uid}


def test_children_are_deleted_only_when_the_moedeployment_owns_them():
    spec = make_spec()
    children, pods, status = steady(spec)
    extra = dataclasses.replace(
        children[("Service", "m-ready")], name="m-old", uid="svc-uid", owner_uids=("uid-1",)
    )
    foreign = dataclasses.replace(extra, name="m-foreign", uid="f-uid", owner_uids=("another-owner",))
    children[("Service", "m-old")] = extra
    children[("Service", "m-foreign")] = foreign
    result = run(spec, children, pods, status)
    assert [(c.name, c.uid) for c in result.delete] == [("m-old", "svc-uid")]


def test_failed_create_is_degraded_with_the_servers_message():
    spec = make_spec()
    children, pods, status = steady(spec)
    message = 'create Pod m-decode-0-1 in StatefulSet m-decode-0 failed error: pods "m-decode-0-1" is forbidden: exceeded quota: gpus'
    pods["m-decode-0"] = pods["m-decode-0"][:1]
    result = run(spec, children, pods, status, create_failures={"m-decode-0": message})
    degraded = cond(result.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "FailedCreate")
    assert degraded["message"] == f"group m-decode-0: {message}"


def test_start_up_grace_defers_a_restart_while_a_peer_still_pulls_its_image():
    spec = make_spec(restartPolicy={"startupGrace": "10m"})
    children, _ = converged(spec)
    status = run(spec, children, {}).status  # new groups: their grace starts now
    assert all(g["formingSince"] == timestamp(NOW) for g in status["groups"])
    pods = {
        "m-prefill-0": pods_for("m-prefill-0", 1),
        "m-decode-0": [
            PodState("m-decode-0-0", "u0", "m-decode-0", False, "Running", restart_count=1,
                     failure="container engine exited 1 (Error): rendezvous timed out"),
            PodState("m-decode-0-1", "u1", "m-decode-0", False, "Pending", starting=True),
        ],
    }  # fmt: skip
    within = run(spec, children, pods, status, now=NOW + 300)
    assert not within.delete_pods
    assert {g["name"]: g["phase"] for g in within.status["groups"]}["m-decode-0"] == "Forming"
    # Every pod has started (the pull finished): the failure now restarts the group, once.
    pods["m-decode-0"][1] = dataclasses.replace(pods["m-decode-0"][1], phase="Running", starting=False)
    started = run(spec, children, pods, within.status, now=NOW + 310)
    assert started.delete_pods == {"m-decode-0": ["m-decode-0-0", "m-decode-0-1"]}
    # Past the grace a failure restarts the group even while a peer still pulls.
    pods["m-decode-0"][1] = dataclasses.replace(pods["m-decode-0"][1], phase="Pending", starting=True)
    assert run(spec, children, pods, within.status, now=NOW + 601).delete_pods


def test_a_ready_group_has_no_start_up_grace():
    spec = make_spec()
    children, pods, status = steady(spec)
    assert all("formingSince" not in g for g in status["groups"])
    pods["m-decode-0"][1] = dataclasses.replace(pods["m-decode-0"][1], restart_count=1, starting=True)
    assert run(spec, children, pods, status, now=NOW + 5).delete_pods


def test_pod_and_node_state_from_api_bodies():
    body = {
        "metadata": {
            "name": "m-decode-0-1", "uid": "u", "labels": {"moefleet.ai/group": "m-decode-0"},
            "deletionTimestamp": "2026-11-30T10:00:00Z",
            "ownerReferences": [{"kind": "StatefulSet", "name": "m-decode-0", "controller": True, "uid": "s"}],
        },
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]},
    }  # fmt: skip
    pod = pod_state(body)
    assert (pod.node, pod.owner, pod.starting, pod.deleting) == ("n1", "m-decode-0", True, True)
    assert pod.deletion_deadline == 1_796_032_800.0  # 2026-11-30T10:00:00Z
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert node_ready(ready)
    assert not node_ready({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}})
    tainted = {
        **ready,
        "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]},
    }
    assert not node_ready(tainted)


def test_a_pod_evicted_from_a_not_ready_node_restarts_its_whole_group():
    """Ready -> node NotReady (Forming, members kept) -> the pod there is deleted (taint eviction): the
    group no longer has the members it was Ready with, so all its pods restart together."""
    spec = make_spec()
    children, pods, status = steady(spec)
    nodes = {p.node: True for members in pods.values() for p in members}
    nodes["node-m-decode-0-1"] = False
    forming = run(spec, children, pods, status, node_ready=nodes)
    assert not forming.delete_pods
    pods["m-decode-0"][1] = _stuck(pods["m-decode-0"][1], deadline=NOW + 60)
    result = run(spec, children, pods, forming.status, node_ready=nodes, now=NOW + 1)
    assert result.delete_pods == {"m-decode-0": ["m-decode-0-0"]}  # the stuck one is already deleting
    assert not result.force_delete  # not yet: its deletion deadline has not even passed
    group = next(g for g in result.status["groups"] if g["name"] == "m-decode-0")
    assert (
        group["phase"] == "Restarting"
        and group["lastFailure"] == "a pod of the group disappeared or was replaced"
    )


# -- status batching: progress-only changes wait for the batch period, everything else is written at once ----
REV = "m-decode-0-rev1"


def _start_up(spec):
    """The statuses the planner reports, in order, while a fresh deployment's decode group starts: no pod
    yet, pods starting, one node Ready, the group Ready (prefill and gateway already Ready)."""
    children, pods = converged(spec)
    starting = pods_for("m-decode-0", 2, ready=False, revision=REV)
    one_ready = [dataclasses.replace(starting[0], ready=True), starting[1]]
    status = None
    steps = []
    for decode in ([], starting, one_ready, pods_for("m-decode-0", 2, revision=REV)):
        pods["m-decode-0"] = decode
        status = settle(spec, children, pods, status=status).status
        steps.append(status)
    return steps


def test_progress_only_status_changes_wait_for_the_batch_period():
    spec = make_spec()
    no_pod, starting, one_ready, ready = _start_up(spec)
    group = next(g for g in starting["groups"] if g["name"] == "m-decode-0")
    assert group["phase"] == "Forming" and one_ready != starting  # the steps differ...
    for old, new in ((no_pod, starting), (starting, one_ready)):  # ...but only in progress
        assert not write_due(old, new, False, 1.0, 10.0)
        assert write_due(old, new, False, 10.0, 10.0)  # the batch period is over
        assert write_due(old, new, False, None, 10.0)  # no write known (e.g. after an operator restart)
        assert write_due(old, new, True, 1.0, 10.0)  # the same pass writes something else
        assert write_due(old, new, False, 1.0, 0.0)  # batching off
    assert not write_due(ready, ready, True, None, 0.0)  # nothing changed: never a write


def test_a_group_turning_ready_and_condition_changes_are_written_at_once():
    spec = make_spec()
    _, _, one_ready, ready = _start_up(spec)
    assert cond(ready, "Ready")["status"] == "True" and cond(one_ready, "Ready")["status"] == "False"
    assert write_due(one_ready, ready, False, 0.5, 10.0)
    # A group becoming Ready records its members (how a replaced pod is detected later): never deferred,
    # even while the deployment's conditions stay as they were (another group is still starting).
    children, pods = converged(spec)
    pods["m-decode-0"] = pods_for("m-decode-0", 2, ready=False, revision=REV)  # still starting throughout
    pods["m-prefill-0"] = pods_for("m-prefill-0", 1, ready=False, revision="m-prefill-0-rev1")
    before = settle(spec, children, pods).status
    pods["m-prefill-0"] = pods_for("m-prefill-0", 1, revision="m-prefill-0-rev1")
    after = settle(spec, children, pods, status=before).status
    assert [c["status"] for c in after["conditions"]] == [c["status"] for c in before["conditions"]]
    assert write_due(before, after, False, 0.5, 10.0)
    # Degraded's reason changing (another problem) is news too.
    degraded = {**ready, "conditions": [
        {**c, "status": "True", "reason": "Unschedulable"} if c["type"] == "Degraded" else c
        for c in ready["conditions"]
    ]}  # fmt: skip
    other = {**degraded, "conditions": [
        {**c, "reason": "InsufficientGPUs"} if c["type"] == "Degraded" else c for c in degraded["conditions"]
    ]}  # fmt: skip
    assert write_due(ready, degraded, False, 0.5, 10.0) and write_due(degraded, other, False, 0.5, 10.0)
