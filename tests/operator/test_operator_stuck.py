"""Never stuck (issue 13): deletion without the operator, pods stuck Terminating on an unreachable node,
NotReady nodes, apply errors and FailedCreate surfacing as Degraded with the API server's message.

Against the real kube-apiserver + controller-manager + scheduler with kwok nodes (conftest.py); the operator
runs from this checkout as the chart's ServiceAccount.
"""

from __future__ import annotations

import json
import time
from functools import partial

import pytest
from support.fake_kubelet import NodeHeartbeat, unmanaged_node
from support.operator_cluster import (
    condition,
    get_moed,
    list_items,
    live_engine_pods,
    small_moed,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

MOED = "/apis/moefleet.ai/v1alpha1/namespaces/{ns}/moedeployments"

small = partial(small_moed, fast_restarts=True)  # restarts back off in seconds here


def engine_pods(cluster, namespace: str, name: str) -> dict[str, dict]:
    """name -> pod of live (not deleting) engine pods."""
    return {p["metadata"]["name"]: p for p in live_engine_pods(cluster, namespace, name)}


def events(cluster, namespace: str, name: str, reason: str) -> list[dict]:
    items = cluster.api_get(f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name and e["reason"] == reason]


def _exists(cluster, path: str) -> bool:
    result = cluster.kubectl("get", "--raw", path, check=False)
    return result.returncode == 0


def test_moedeployment_and_its_namespace_delete_while_the_operator_is_stopped(
    operator, pool, kube_cluster, kube_namespace
):
    """No finalizer on a MoEDeployment: with the operator down, `kubectl delete moed` returns and the
    children are garbage-collected; deleting the namespace of another one finishes too. A finalizer an
    older operator left (kopf's `moefleet.ai/operator`) is removed by the running operator."""
    kube_cluster.apply(small("keep", {"mixed": {"replicas": 1, "nodesPerReplica": 1}}), kube_namespace)
    other = kube_cluster.create_namespace(f"{kube_namespace}-b"[:63])
    kube_cluster.apply(small("other", {"mixed": {"replicas": 1, "nodesPerReplica": 1}}), other)
    wait_ready(kube_cluster, kube_namespace, "keep")
    wait_ready(kube_cluster, other, "other")
    for ns, name in ((kube_namespace, "keep"), (other, "other")):
        assert not get_moed(kube_cluster, ns, name)["metadata"].get("finalizers"), "a finalizer was added"
    # An older operator's finalizer is removed (upgrades unblock deletion of existing objects).
    kube_cluster.kubectl(
        "patch", "moed", "keep", "-n", kube_namespace, "--type=merge",
        "-p", json.dumps({"metadata": {"finalizers": ["moefleet.ai/operator"]}}),
    )  # fmt: skip
    wait_for(
        lambda: not get_moed(kube_cluster, kube_namespace, "keep")["metadata"].get("finalizers"),
        30,
        "the operator to drop the old kopf finalizer",
    )
    operator.stop()
    try:
        started = time.monotonic()
        kube_cluster.kubectl("delete", "moed", "keep", "-n", kube_namespace, "--timeout=30s", timeout=40)
        kube_cluster.kubectl("delete", "namespace", other, "--wait=false")

        def children_gone() -> bool:
            found = list_items(
                kube_cluster,
                f"/apis/apps/v1/namespaces/{kube_namespace}/statefulsets",
                "moefleet.ai/deployment=keep",
            )
            return not found

        wait_for(children_gone, 60, "the deleted MoEDeployment's StatefulSets to be garbage-collected")
        wait_for(
            lambda: not _exists(kube_cluster, f"/api/v1/namespaces/{other}"), 150, f"namespace {other} gone"
        )
        print(
            f"deleted a MoEDeployment and a namespace with the operator down in {time.monotonic() - started:.1f}s"
        )
    finally:
        operator.start()


def _node_of(pod: dict) -> str:
    return pod["spec"]["nodeName"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _set_node_ready(cluster, node: str, ready: bool) -> None:
    condition_ = {
        "type": "Ready", "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "NodeStatusUnknown", "message": "set by the test",
        "lastHeartbeatTime": _now(), "lastTransitionTime": _now(),
    }  # fmt: skip
    cluster.kubectl(
        "patch", "node", node, "--subresource=status", "--type=strategic",
        "-p", json.dumps({"status": {"conditions": [condition_]}}),
    )  # fmt: skip


def _act_as_kubelet(cluster, namespace: str, pod: dict) -> None:
    """Report the pod Running and Ready, as the (test-played) kubelet of a node kwok does not manage."""
    containers = [c["name"] for c in pod["spec"]["containers"]]
    ok = [
        {"type": t, "status": "True", "lastTransitionTime": _now()}
        for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    status = {
        "phase": "Running", "podIP": "10.99.0.7", "podIPs": [{"ip": "10.99.0.7"}], "conditions": ok,
        "containerStatuses": [
            {"name": c, "ready": True, "started": True, "restartCount": 0, "image": "x", "imageID": "",
             "state": {"running": {"startedAt": _now()}}}
            for c in containers
        ],
    }  # fmt: skip
    cluster.kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def test_pod_stuck_terminating_on_an_unreachable_node_is_force_deleted(
    operator, pool, kube_cluster, kube_namespace
):
    """A NotReady node makes its group not Ready at once (Degraded NodeNotReady); a pod deleted there stays
    Terminating (no kubelet confirms it), so the operator force-deletes it (grace 0, uid precondition) once
    it is the timeout past its deletion deadline, the group restarts and re-forms on healthy nodes.

    The unreachable node is a Node kwok does not manage (the test plays its kubelet until it goes away);
    two kwok nodes carry the group's other pod and its replacement."""
    operator.stop()
    operator.extra_env["MOEFLEET_OPERATOR_FORCE_DELETE_AFTER_SECONDS"] = "3"
    operator.start()
    name, label = "stuck", {"moefleet.test/stuck": "yes"}
    unmanaged = "stuck-unmanaged-node"
    kube_cluster.apply(unmanaged_node(unmanaged, label))
    heartbeat = NodeHeartbeat(kube_cluster, unmanaged).__enter__()
    # One kwok node now: with two nodes for two pods the scheduler must use the unmanaged one. The second
    # healthy node comes once the group is Ready, for the replacement.
    healthy = kube_cluster.create_gpu_nodes(1, prefix="stuck-kwok-a", labels=label)
    try:
        kube_cluster.apply(
            small(name, {"mixed": {"replicas": 1, "nodesPerReplica": 2, "nodeSelector": label}}),
            kube_namespace,
        )
        state: dict = {}

        def bound_to_unmanaged() -> bool:
            pods = engine_pods(kube_cluster, kube_namespace, name)
            state["victim"] = next((p for p in pods.values() if p["spec"].get("nodeName") == unmanaged), None)
            state["placed"] = {n: p["spec"].get("nodeName") for n, p in pods.items()}
            return (
                len(pods) == 2
                and all(p["spec"].get("nodeName") for p in pods.values())
                and state["victim"] is not None
            )

        try:
            wait_for(bound_to_unmanaged, 180, "one pod on the unmanaged node, one on a kwok node")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; pods -> nodes: {state.get('placed')}") from None
        victim = state["victim"]
        _act_as_kubelet(kube_cluster, kube_namespace, victim)
        wait_ready(kube_cluster, kube_namespace, name)
        healthy += kube_cluster.create_gpu_nodes(1, prefix="stuck-kwok-b", labels=label)
        before = engine_pods(kube_cluster, kube_namespace, name)
        marked = time.monotonic()
        heartbeat.stop()  # the kubelet goes silent
        _set_node_ready(kube_cluster, unmanaged, False)
        kube_cluster.kubectl("cordon", unmanaged)  # the node controller's not-ready taint, on a real cluster

        def not_ready() -> bool:
            body = get_moed(kube_cluster, kube_namespace, name)
            return (
                condition(body, "Ready").get("status") == "False"
                and condition(body, "Degraded").get("reason") == "NodeNotReady"
            )

        wait_for(not_ready, 45, "Ready=False, Degraded=NodeNotReady once the node is NotReady")
        reacted = time.monotonic() - marked
        body = get_moed(kube_cluster, kube_namespace, name)
        assert unmanaged in condition(body, "Degraded")["message"]
        assert body["status"]["groups"][0]["phase"] != "Ready"
        assert engine_pods(kube_cluster, kube_namespace, name).keys() == before.keys()  # nothing deleted yet
        # The pod there is deleted (the taint manager's eviction on a real cluster): no kubelet confirms it.
        pod_path = f"/api/v1/namespaces/{kube_namespace}/pods/{victim['metadata']['name']}"
        kube_cluster.kubectl(
            "delete",
            "pod",
            victim["metadata"]["name"],
            "-n",
            kube_namespace,
            "--grace-period=10",
            "--wait=false",
        )
        deleted = time.monotonic()
        time.sleep(6)
        stuck = kube_cluster.api_get(pod_path)["metadata"]
        assert stuck["uid"] == victim["metadata"]["uid"] and stuck.get("deletionTimestamp"), "not stuck"

        def victim_gone() -> bool:
            found = kube_cluster.kubectl("get", "--raw", pod_path, check=False)
            return (
                found.returncode != 0
                or json.loads(found.stdout)["metadata"]["uid"] != victim["metadata"]["uid"]
            )

        wait_for(victim_gone, 60, "the operator to force-delete the stuck pod")
        waited = time.monotonic() - deleted
        assert waited >= 10, f"force-deleted {waited:.1f}s after the delete, before its deletion deadline"

        def replaced() -> bool:
            now = engine_pods(kube_cluster, kube_namespace, name)
            old = {q["metadata"]["uid"] for q in before.values()}
            return (
                len(
                    [p for p in now.values() if p["metadata"]["uid"] not in old and p["spec"].get("nodeName")]
                )
                == 2
            )

        wait_for(replaced, 150, "both pods of the group recreated (the whole group restarts)")
        moed = wait_ready(kube_cluster, kube_namespace, name, timeout=120)
        after = engine_pods(kube_cluster, kube_namespace, name)
        assert sorted(_node_of(p) for p in after.values()) == sorted(healthy)
        [event] = events(kube_cluster, kube_namespace, name, "ForceDeletedPods")
        assert (
            event["type"] == "Warning"
            and f"{victim['metadata']['name']} (node {unmanaged})" in event["message"]
        )
        assert condition(moed, "Degraded")["status"] == "False"
        print(
            f"group not Ready {reacted:.1f}s after its node went NotReady; stuck pod force-deleted after {waited:.1f}s"
        )
    finally:
        heartbeat.stop()
        kube_cluster.kubectl("delete", "node", unmanaged, *healthy, "--wait=false", check=False)
        kube_cluster.kubectl(
            "delete", "lease", unmanaged, "-n", "kube-node-lease", "--wait=false", check=False
        )
        operator.stop()
        operator.extra_env.pop("MOEFLEET_OPERATOR_FORCE_DELETE_AFTER_SECONDS", None)
        operator.start()


def _quota(cluster, namespace: str, name: str, hard: dict[str, str]) -> None:
    cluster.apply(
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}, "spec": {"hard": hard}},
        namespace,
    )
    path = f"/api/v1/namespaces/{namespace}/resourcequotas/{name}"
    wait_for(
        lambda: (
            set(cluster.api_get(path).get("status", {}).get("hard", {})) == set(hard)
            and cluster.api_get(path)["status"]["hard"] == {k: str(v) for k, v in hard.items()}
        ),
        30,
        f"quota {name} in force",
    )


def test_apply_refused_by_a_quota_is_degraded_with_the_servers_message_and_retried(
    operator, pool, kube_cluster, kube_namespace
):
    """A ResourceQuota allows one StatefulSet; the second group's apply is refused (HTTP 403): Degraded
    ApplyFailed carries the API server's message; once the quota is lifted the retry (backoff) converges."""
    # The test counts the operator's StatefulSet applies (process-wide): first let the deployments of earlier
    # tests (whose namespaces may still be terminating) settle.
    operator.wait_quiet("statefulsets", "PATCH", quiet_s=4, timeout=120)
    _quota(kube_cluster, kube_namespace, "one-sts", {"count/statefulsets.apps": "1"})
    name = "quota"
    kube_cluster.apply(small(name, {"mixed": {"replicas": 2, "nodesPerReplica": 1}}), kube_namespace)
    state: dict = {}

    def apply_failed() -> bool:
        state["body"] = get_moed(kube_cluster, kube_namespace, name)
        return condition(state["body"], "Degraded").get("reason") == "ApplyFailed"

    wait_for(apply_failed, 60, "Degraded=ApplyFailed")
    message = condition(state["body"], "Degraded")["message"]
    assert "exceeded quota: one-sts" in message and "count/statefulsets.apps" in message, message
    assert condition(state["body"], "Degraded")["status"] == "True"
    assert any(e["type"] == "Warning" for e in events(kube_cluster, kube_namespace, name, "DegradedTrue"))

    def sts_applies() -> float:
        return operator.api_requests().get(("PATCH", "statefulsets"), 0.0)

    then = sts_applies()
    time.sleep(8)  # backoff 2 s, 4 s, 8 s, ...: at most 3 attempts, not one per resync (every 1 s here)
    attempts = sts_applies() - then
    assert 1 <= attempts <= 3, f"{attempts} StatefulSet applies in 8 s: the failed apply is not backed off"
    kube_cluster.kubectl("delete", "resourcequota", "one-sts", "-n", kube_namespace)
    moed = wait_ready(kube_cluster, kube_namespace, name, timeout=90)
    assert condition(moed, "Degraded")["status"] == "False"


def test_failed_create_from_a_gpu_quota_is_degraded_with_the_servers_message(
    operator, pool, kube_cluster, kube_namespace
):
    """A GPU quota admits one of a group's two 8-GPU pods: the StatefulSet controller's FailedCreate
    (exceeded quota) becomes Degraded FailedCreate with its message; raising the quota lets the group form."""
    _quota(kube_cluster, kube_namespace, "gpus", {"requests.nvidia.com/gpu": "8"})
    name = "gpuquota"
    kube_cluster.apply(small(name, {"mixed": {"replicas": 1, "nodesPerReplica": 2}}), kube_namespace)
    state: dict = {}

    def failed_create() -> bool:
        state["body"] = get_moed(kube_cluster, kube_namespace, name)
        return condition(state["body"], "Degraded").get("reason") == "FailedCreate"

    wait_for(failed_create, 60, "Degraded=FailedCreate")
    message = condition(state["body"], "Degraded")["message"]
    assert message.startswith(f"group {name}-mixed-0: ") and "exceeded quota: gpus" in message, message
    assert condition(state["body"], "Ready")["status"] == "False"
    _quota(kube_cluster, kube_namespace, "gpus", {"requests.nvidia.com/gpu": "16"})
    moed = wait_ready(kube_cluster, kube_namespace, name, timeout=150)
    assert condition(moed, "Degraded")["status"] == "False"
