"""observed: pod and child bodies (as the API returns them) reduced to the data the planner decides on."""

from __future__ import annotations

import pytest
from moefleet.operator import labels as L
from moefleet.operator.observed import applied_memo_expired, child_state, pod_failed, pod_state
from moefleet.operator.settings import OperatorSettings, from_environment
from support.kwok_nodes import failed_pod_status


def running_pod(name="m-decode-0-1", ready=True, restarts=0):
    return {
        "metadata": {"name": name, "uid": "u1", "labels": {L.GROUP_LABEL: "m-decode-0"}},
        "spec": {"containers": [{"name": "engine", "image": "img"}]},
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "ContainersReady", "status": "True" if ready else "False"},
                {"type": L.GROUP_READY_CONDITION, "status": "True", "reason": "GroupReady"},
            ],
            "containerStatuses": [{"name": "engine", "restartCount": restarts, "state": {"running": {}}}],
        },
    }


def test_ready_running_pod():
    pod = pod_state(running_pod())
    assert (pod.group, pod.ready, pod.phase, pod.restart_count) == ("m-decode-0", True, "Running", 0)
    assert pod.group_ready_gate and pod.gate_by_operator
    foreign = running_pod()
    foreign["status"]["conditions"][1].pop("reason")  # what kwok writes: status only
    assert pod_state(foreign).group_ready_gate and not pod_state(foreign).gate_by_operator
    assert not pod_failed(pod)


def test_failed_pod_carries_its_termination_message():
    body = running_pod()
    body["status"] = failed_pod_status(body, "CUDA error: out of memory", exit_code=3)["status"]
    pod = pod_state(body)
    assert pod_failed(pod) and not pod.ready
    assert "exited 3" in pod.failure and "CUDA error: out of memory" in pod.failure


def test_container_restarted_in_place_is_a_failure():
    body = running_pod(restarts=1)
    body["status"]["containerStatuses"][0]["lastState"] = {
        "terminated": {"exitCode": 137, "reason": "OOMKilled", "message": ""}
    }
    pod = pod_state(body)
    assert pod_failed(pod) and "OOMKilled" in pod.failure


def test_deleting_pod_is_never_a_failure():
    body = running_pod(restarts=2)
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not pod_failed(pod_state(body))


def test_unschedulable_pod_keeps_the_schedulers_message():
    body = running_pod(ready=False)
    body["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/5 nodes are available: 5 Insufficient nvidia.com/gpu.",
            }
        ],
    }
    pod = pod_state(body)
    assert pod.unschedulable == "0/5 nodes are available: 5 Insufficient nvidia.com/gpu."
    assert not pod_failed(pod)


def test_child_state_reads_hash_replicas_revision_and_live_content():
    body = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": "m-decode-0",
            "generation": 4,
            "resourceVersion": "812",
            "uid": "x",
            "labels": {"a": "b"},
            "annotations": {L.SPEC_HASH: "abc"},
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"replicas": 9, "serviceName": "m-decode-0"},
        "status": {"readyReplicas": 7, "observedGeneration": 3, "updateRevision": "m-decode-0-5d8f"},
    }
    state = child_state(body)
    assert (state.kind, state.name, state.spec_hash, state.replicas, state.ready_replicas) == (
        "StatefulSet", "m-decode-0", "abc", 9, 7,
    )  # fmt: skip
    assert (state.update_revision, state.generation, state.observed_generation, state.resource_version) == (
        "m-decode-0-5d8f", 4, 3, 812,
    )  # fmt: skip
    assert not state.revision_known  # the controller has not observed generation 4 yet
    # Only what the operator sets can drift: no status, uid, managedFields or resourceVersion.
    assert state.live == {
        "metadata": {"labels": {"a": "b"}, "annotations": {L.SPEC_HASH: "abc"}},
        "spec": {"replicas": 9, "serviceName": "m-decode-0"},
    }


def test_pod_revision_comes_from_the_statefulset_controllers_label():
    body = running_pod()
    body["metadata"]["labels"][L.CONTROLLER_REVISION] = "m-decode-0-7c9b"
    assert pod_state(body).revision == "m-decode-0-7c9b"
    assert pod_state(running_pod()).revision == ""


def test_settings_from_environment():
    settings = from_environment({"MOEFLEET_OPERATOR_RESYNC_SECONDS": "2.5", "MOEFLEET_OPERATOR_WORKERS": "3"})
    assert settings == OperatorSettings(resync_seconds=2.5, workers=3)
    with pytest.raises(ValueError, match="MOEFLEET_OPERATOR_WORKERS='many'"):
        from_environment({"MOEFLEET_OPERATOR_WORKERS": "many"})
    with pytest.raises(ValueError, match="RESYNC_SECONDS"):
        from_environment({"MOEFLEET_OPERATOR_RESYNC_SECONDS": "0"})


# -- the applied-object memo: trusted until the watch has got past the write, not for a fixed 30 s ----------
def test_applied_memo_outlives_a_lagging_watch_and_ends_once_the_watch_passes_the_write():
    # The watch of this kind has delivered nothing at or after our write (version 500) for 45 s: the old 30 s
    # rule re-applied the child (and every other child of the deployment); now it is still trusted.
    assert not applied_memo_expired(caught_up=False, version=500, watch_progress=420, age=45.0)
    # The watch delivered an event at 510 >= 500 but the index does not hold the child: it was deleted after
    # our write (e.g. by hand), so the index is the truth and the child is re-created - once the index had
    # time to store what its (concurrently run) index functions returned.
    assert not applied_memo_expired(
        caught_up=False, version=500, watch_progress=510, age=20.0, passed_for=2.0
    )
    assert applied_memo_expired(caught_up=False, version=500, watch_progress=510, age=20.0, passed_for=15.0)
    assert applied_memo_expired(caught_up=True, version=500, watch_progress=420, age=1.0)  # shown: done
    assert applied_memo_expired(caught_up=False, version=500, watch_progress=420, age=601.0)  # a cap
    # Without a version from the apply, or a kind without a tracked watch: the 30 s rule.
    assert not applied_memo_expired(caught_up=False, version=0, watch_progress=420, age=29.0)
    assert applied_memo_expired(caught_up=False, version=0, watch_progress=420, age=31.0)
    assert applied_memo_expired(caught_up=False, version=500, watch_progress=None, age=31.0)
