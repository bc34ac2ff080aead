"""The operator against a real kube-apiserver (+ controller-manager, scheduler, kwok GPU nodes).

The operator runs from this checkout as the Helm chart's ServiceAccount (conftest.py). Deployments made here
select the `moefleet.test/pool: operator` nodes so other tests' nodes never matter.
"""

from __future__ import annotations

import json
import subprocess
import time
from functools import partial

import pytest
from support.fake_kubelet import FakeKubelet, NodeHeartbeat, unmanaged_node
from support.operator_catalogue import MANIFESTS, invalid_cases
from support.operator_cluster import (
    CHILD_PATHS,
    ENGINE,
    condition,
    get_moed,
    is_ready,
    list_items,
    live_children,
    live_engine_pods,
    patch_spec,
    small_moed,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

small = partial(small_moed, fast_restarts=True)  # restarts back off in seconds here


def pods_by_group(cluster, namespace: str, name: str) -> dict[str, dict[str, str]]:
    """group -> {pod name: uid} of live engine pods."""
    out: dict[str, dict[str, str]] = {}
    for pod in live_engine_pods(cluster, namespace, name):
        meta = pod["metadata"]
        out.setdefault(meta["labels"]["moefleet.ai/group"], {})[meta["name"]] = meta["uid"]
    return out


def children(cluster, namespace: str, name: str) -> dict[str, list[str]]:
    selector = f"moefleet.ai/deployment={name}"
    return {
        kind: sorted(o["metadata"]["name"] for o in list_items(cluster, path.format(ns=namespace), selector))
        for kind, path in CHILD_PATHS.items()
    }


@pytest.fixture(scope="module")
def pool(pool, moefleet_chart):
    """The operator pool (conftest), and the H200s tainted like GPU-operator clusters do."""
    for node in pool["h200"]:
        moefleet_chart.kubectl("taint", "node", node, "nvidia.com/gpu=present:NoSchedule", "--overwrite")
    return pool


def _model_claim(cluster, namespace: str, claim: str) -> None:
    """A bound ReadOnlyMany claim (static PV) as the example manifests expect (the model from a PVC)."""
    pv = f"{claim}-{namespace}"
    cluster.apply({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {
            "capacity": {"storage": "2Ti"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
            "hostPath": {"path": "/data/kimi"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    })  # fmt: skip
    cluster.apply(
        {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                "resources": {"requests": {"storage": "2Ti"}},
            },
        },
        namespace,
    )  # fmt: skip
    wait_for(
        lambda: (
            cluster.api_get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            .get("status", {})
            .get("phase")
            == "Bound"
        ),
        60,
        f"the {claim} claim to bind",
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_example_manifest_reconciles_to_ready(operator, pool, kube_cluster, kube_namespace, path):
    import yaml

    body = yaml.safe_load(path.read_text())
    name = body["metadata"]["name"]
    claim = (body["spec"]["model"].get("pvc") or {}).get("claimName")
    if claim:
        _model_claim(kube_cluster, kube_namespace, claim)
    start = time.monotonic()
    kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", str(path))
    # What a kubectl user runs: the Available condition exists and turns True.
    kube_cluster.kubectl(
        "wait",
        "-n",
        kube_namespace,
        "--for=condition=Available",
        f"moed/{name}",
        "--timeout=180s",
        timeout=200,
    )
    moed = wait_ready(kube_cluster, kube_namespace, name, timeout=180)
    took = time.monotonic() - start
    spec = moed["spec"]
    status = moed["status"]
    found = children(kube_cluster, kube_namespace, name)
    groups = [(role, r) for role, rs in spec["roles"].items() for r in range(rs["replicas"])]
    assert found["StatefulSet"] == sorted(f"{name}-{role}-{r}" for role, r in groups)
    assert found["PodDisruptionBudget"] == sorted(f"{name}-{role}" for role in spec["roles"])  # one per role
    assert found["Deployment"] == [f"{name}-gateway"] and found["ConfigMap"] == [f"{name}-gateway"]
    headless = {f"{name}-{role}-{r}" for role, r in groups}
    assert set(found["Service"]) == headless | {f"{name}-ready"} | {f"{name}-gateway"}
    # Status counts agree with the spec; every engine pod sits on a GPU node with the GPUs it asked for.
    for role, role_spec in spec["roles"].items():
        assert status["roles"][role]["readyGroups"] == role_spec["replicas"]
        assert status["roles"][role]["readyNodes"] == role_spec["replicas"] * role_spec["nodesPerReplica"]
        assert status["groupsReady"][role] == f"{role_spec['replicas']}/{role_spec['replicas']}"
        assert status["roles"][role]["updatedGroups"] == role_spec["replicas"]
    assert [condition(moed, t)["status"] for t in ("Available", "Ready", "Progressing", "Degraded")] == [
        "True", "True", "False", "False",
    ]  # fmt: skip
    revisions = {
        sts["metadata"]["name"]: sts["status"]["updateRevision"]
        for sts in list_items(
            kube_cluster,
            f"/apis/apps/v1/namespaces/{kube_namespace}/statefulsets",
            f"moefleet.ai/deployment={name}",
        )
    }
    nodes = {n["metadata"]["name"]: n for n in kube_cluster.api_get("/api/v1/nodes")["items"]}
    pods = list_items(
        kube_cluster, f"/api/v1/namespaces/{kube_namespace}/pods", f"moefleet.ai/deployment={name},{ENGINE}"
    )
    assert len(pods) == sum(r["replicas"] * r["nodesPerReplica"] for r in spec["roles"].values())
    for pod in pods:
        node = nodes[pod["spec"]["nodeName"]]
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
        gpus = pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert str(gpus) == str(spec["roles"][pod["metadata"]["labels"]["moefleet.ai/role"]]["gpusPerNode"])
        if path.stem == "kimi-k2-h200":
            assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
        # The readiness gate is open, by the operator's own write (kwok would open it by itself, without
        # the operator's reason): the whole group is Ready.
        gate = [c for c in pod["status"]["conditions"] if c["type"] == "moefleet.ai/group-ready"]
        assert gate and (gate[0]["status"], gate[0].get("reason")) == ("True", "GroupReady"), gate
        # ... and the pod runs its StatefulSet's current template (what "updatedGroups" measured).
        labels = pod["metadata"]["labels"]
        assert labels["controller-revision-hash"] == revisions[labels["moefleet.ai/group"]]
    print(f"{path.stem}: Ready in {took:.1f}s with {len(pods)} engine pods")


@pytest.mark.parametrize("case", invalid_cases(), ids=lambda c: c["name"])
def test_invalid_moedeployment_is_rejected_at_admission(moefleet_chart, case):
    result = moefleet_chart.kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(case["body"]), check=False
    )
    assert result.returncode != 0, f"{case['name']} was accepted"
    assert case["api_field"] in result.stderr, result.stderr


def test_pod_failure_restarts_exactly_its_group(operator, pool, kube_cluster, kube_namespace):
    name = "fail"
    kube_cluster.apply(
        small(
            name,
            {
                "prefill": {"replicas": 1, "nodesPerReplica": 1},
                "decode": {"replicas": 2, "nodesPerReplica": 2},
            },
        ),
        kube_namespace,
    )
    wait_ready(kube_cluster, kube_namespace, name)
    before = pods_by_group(kube_cluster, kube_namespace, name)
    victim = "fail-decode-1-1"
    kube_cluster.fail_pod(kube_namespace, victim, "CUDA error: an illegal memory access was encountered")

    def group_restarted() -> bool:
        now = pods_by_group(kube_cluster, kube_namespace, name)
        fresh = now.get("fail-decode-1", {})
        return len(fresh) == 2 and not set(fresh.values()) & set(before["fail-decode-1"].values())

    wait_for(group_restarted, 60, "decode-1's pods to be replaced together")
    moed = wait_ready(kube_cluster, kube_namespace, name)
    after = pods_by_group(kube_cluster, kube_namespace, name)
    assert after["fail-prefill-0"] == before["fail-prefill-0"]
    assert after["fail-decode-0"] == before["fail-decode-0"]
    group = next(g for g in moed["status"]["groups"] if g["name"] == "fail-decode-1")
    assert group["restarts"] == 1 and "illegal memory access" in group["lastFailure"]
    assert moed["status"]["lastRestart"]["group"] == "fail-decode-1"
    events = kube_cluster.api_get(f"/api/v1/namespaces/{kube_namespace}/events")["items"]
    restart_events = [e for e in events if e["reason"] == "GroupRestarting"]
    assert len(restart_events) == 1 and "illegal memory access" in restart_events[0]["message"]
    assert "fail-decode-1" in restart_events[0]["message"]


def test_scaling_touches_only_added_and_removed_groups(operator, pool, kube_cluster, kube_namespace):
    name = "scale"
    kube_cluster.apply(
        small(name, {"mixed": {"replicas": 1, "nodesPerReplica": 2, "gpusPerNode": 4}}), kube_namespace
    )
    wait_ready(kube_cluster, kube_namespace, name)
    sts_path = f"/apis/apps/v1/namespaces/{kube_namespace}/statefulsets/scale-mixed-0"
    first = kube_cluster.api_get(sts_path)["metadata"]["resourceVersion"]
    pods = pods_by_group(kube_cluster, kube_namespace, name)
    patch_spec(kube_cluster, kube_namespace, name, {"roles": {"mixed": {"replicas": 3}}})
    moed = wait_ready(kube_cluster, kube_namespace, name)
    assert moed["status"]["groupsReady"]["mixed"] == "3/3"
    assert kube_cluster.api_get(sts_path)["metadata"]["resourceVersion"] == first  # never written
    assert pods_by_group(kube_cluster, kube_namespace, name)["scale-mixed-0"] == pods["scale-mixed-0"]
    config = kube_cluster.api_get(f"/api/v1/namespaces/{kube_namespace}/configmaps/scale-gateway")
    assert [g["name"] for g in json.loads(config["data"]["config.json"])["roles"]["mixed"]["groups"]] == [
        "scale-mixed-0", "scale-mixed-1", "scale-mixed-2",
    ]  # fmt: skip
    kept = pods_by_group(kube_cluster, kube_namespace, name)["scale-mixed-1"]
    patch_spec(kube_cluster, kube_namespace, name, {"roles": {"mixed": {"replicas": 2}}})

    def scaled_down() -> bool:
        found = children(kube_cluster, kube_namespace, name)
        return (
            found["StatefulSet"] == ["scale-mixed-0", "scale-mixed-1"]
            and "scale-mixed-2" not in found["Service"]
        )

    wait_for(scaled_down, 60, "group scale-mixed-2 to be removed")
    wait_ready(kube_cluster, kube_namespace, name)
    assert kube_cluster.api_get(sts_path)["metadata"]["resourceVersion"] == first
    now = pods_by_group(kube_cluster, kube_namespace, name)
    assert now["scale-mixed-0"] == pods["scale-mixed-0"] and now["scale-mixed-1"] == kept
    assert children(kube_cluster, kube_namespace, name)["PodDisruptionBudget"] == ["scale-mixed"]


def uids(cluster, namespace: str, name: str) -> dict[tuple[str, str], str]:
    """(kind, name) -> uid of every live object labelled with the deployment (pods included)."""
    return {
        (o["kind"], o["metadata"]["name"]): o["metadata"]["uid"]
        for o in live_children(cluster, namespace, name)
    }


def test_operator_killed_mid_reconcile_converges_without_recreating_anything(
    operator, pool, kube_cluster, kube_namespace
):
    """SIGKILL the operator while its first reconcile is visibly under way (some children exist, not all),
    restart it: it converges, and every object that existed at the kill keeps its uid (nothing deleted and
    recreated, no group restarted or re-formed); the objects counted by uid are exactly the desired ones."""
    name = "restart"
    operator.stop()
    kube_cluster.apply(
        small(
            name,
            {
                "prefill": {"replicas": 2, "nodesPerReplica": 1},
                "decode": {"replicas": 2, "nodesPerReplica": 1},
            },
        ),
        kube_namespace,
    )
    operator.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not uids(kube_cluster, kube_namespace, name):
        time.sleep(0.02)
    operator.stop(kill=True)  # inside the first reconcile: its applies have started
    at_kill = uids(kube_cluster, kube_namespace, name)
    assert at_kill, "the operator created nothing before it was killed"
    operator.start()
    moed = wait_ready(kube_cluster, kube_namespace, name)
    time.sleep(2)  # a few more resyncs: a restarted operator must not keep rewriting either
    after = uids(kube_cluster, kube_namespace, name)
    changed = {key for key, uid in at_kill.items() if after.get(key) != uid}
    assert not changed, f"deleted and recreated after the restart: {sorted(changed)}"
    groups = [f"restart-{role}-{r}" for role in ("decode", "prefill") for r in (0, 1)]
    wanted = {("StatefulSet", g) for g in groups} | {("Service", g) for g in groups}
    wanted |= {("PodDisruptionBudget", f"restart-{role}") for role in ("prefill", "decode")}
    wanted |= {
        ("Service", "restart-ready"),  # the gateway's discovery: every group's rank-0 pod, all roles
        ("Deployment", "restart-gateway"),
        ("ConfigMap", "restart-gateway"),
        ("Service", "restart-gateway"),
    }
    wanted |= {("Pod", f"{g}-0") for g in groups}
    assert {key for key in after if not (key[0] == "Pod" and "gateway" in key[1])} == wanted
    assert all("restarts" not in g for g in moed["status"]["groups"])
    events = kube_cluster.api_get(f"/api/v1/namespaces/{kube_namespace}/events")["items"]
    mine = [e for e in events if e["involvedObject"]["name"] == name]
    assert not [e for e in mine if e["reason"] in ("ReformingGroup", "GroupRestarting", "DriftCorrected")]
    partial = sum(kind != "Pod" for kind, _ in at_kill)
    print(
        f"killed the operator with {partial} of {len(wanted) - 4} children created; converged after restart"
    )


def test_deleting_the_moedeployment_garbage_collects_everything(operator, pool, kube_cluster, kube_namespace):
    name = "gone"
    kube_cluster.apply(small(name, {"mixed": {"replicas": 2, "nodesPerReplica": 1}}), kube_namespace)
    wait_ready(kube_cluster, kube_namespace, name)
    kube_cluster.kubectl("delete", "moed", name, "-n", kube_namespace, "--timeout=60s")

    def all_gone() -> bool:
        return not any(children(kube_cluster, kube_namespace, name).values())

    wait_for(all_gone, 90, "every child of the deleted MoEDeployment to be garbage-collected")


def test_asking_for_more_gpus_than_nodes_have_sets_degraded(operator, pool, kube_cluster, kube_namespace):
    name = "greedy"
    kube_cluster.apply(
        small(name, {"mixed": {"replicas": 1, "nodesPerReplica": 2, "gpusPerNode": 16}}), kube_namespace
    )
    state = {}

    def degraded() -> bool:
        body = get_moed(kube_cluster, kube_namespace, name)
        state["status"] = body.get("status")
        return condition(body, "Degraded").get("reason") == "InsufficientGPUs"

    try:
        wait_for(degraded, 60, "Degraded=InsufficientGPUs")
    except TimeoutError:
        raise AssertionError(f"status: {state.get('status')}") from None
    body = get_moed(kube_cluster, kube_namespace, name)
    assert condition(body, "Degraded")["status"] == "True"
    assert "Insufficient nvidia.com/gpu" in condition(body, "Degraded")["message"]
    assert condition(body, "Ready")["status"] == "False"
    assert body["status"]["groups"][0]["phase"] == "Unschedulable"
    events = kube_cluster.api_get(f"/api/v1/namespaces/{kube_namespace}/events")["items"]
    assert any(e["reason"] == "DegradedTrue" and e["type"] == "Warning" for e in events)


def test_nodes_per_replica_change_reforms_groups_one_at_a_time(operator, pool, kube_cluster, kube_namespace):
    name = "reform"
    kube_cluster.apply(
        small(name, {"mixed": {"replicas": 2, "nodesPerReplica": 1, "gpusPerNode": 4}}), kube_namespace
    )
    wait_ready(kube_cluster, kube_namespace, name)
    before = pods_by_group(kube_cluster, kube_namespace, name)
    patch_spec(kube_cluster, kube_namespace, name, {"roles": {"mixed": {"nodesPerReplica": 2}}})
    most_down = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = get_moed(kube_cluster, kube_namespace, name)
        groups = body.get("status", {}).get("groups", [])
        most_down = max(most_down, sum(g.get("phase") != "Ready" for g in groups))
        if is_ready(body) and all(g["nodes"] == 2 for g in groups):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"re-forming did not finish: {body.get('status')}")
    assert most_down == 1, "both groups were down at once"
    after = pods_by_group(kube_cluster, kube_namespace, name)
    for group in ("reform-mixed-0", "reform-mixed-1"):
        assert len(after[group]) == 2 and not set(after[group].values()) & set(before[group].values())
    events = kube_cluster.api_get(f"/api/v1/namespaces/{kube_namespace}/events")["items"]
    events.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))  # creation order
    reformed = [e["message"] for e in events if e["reason"] == "ReformingGroup"]
    assert reformed == [  # one Event per decision: one group at a time
        f"spec changed; re-forming group(s) reform-mixed-{i} (all pods of a group together)" for i in (0, 1)
    ]


PODMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podmonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "PodMonitor",
            "listKind": "PodMonitorList",
            "plural": "podmonitors",
            "singular": "podmonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


def test_pod_monitor_follows_the_spec_where_its_crd_exists(operator, pool, kube_cluster, kube_namespace):
    name = "monitored"
    kube_cluster.apply(PODMONITOR_CRD)
    try:
        kube_cluster.kubectl(
            "wait", "--for=condition=Established", "crd/podmonitors.monitoring.coreos.com", "--timeout=60s"
        )
        kube_cluster.apply(
            small(name, {"mixed": {"replicas": 1, "nodesPerReplica": 1}}, monitoring={"podMonitor": True}),
            kube_namespace,
        )
        wait_ready(kube_cluster, kube_namespace, name)

        def monitor() -> dict | None:
            result = kube_cluster.kubectl(
                "get", "podmonitor", name, "-n", kube_namespace, "-o", "json", check=False
            )
            return json.loads(result.stdout) if result.returncode == 0 else None

        wait_for(lambda: monitor() is not None, 30, "the PodMonitor")
        body = monitor()
        assert body["spec"]["selector"]["matchLabels"]["moefleet.ai/deployment"] == name
        assert body["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
        assert body["metadata"]["ownerReferences"][0]["name"] == name
        patch_spec(kube_cluster, kube_namespace, name, {"monitoring": {"podMonitor": False}})
        wait_for(lambda: monitor() is None, 30, "the PodMonitor to be deleted")
    finally:
        kube_cluster.kubectl(
            "delete", "crd", "podmonitors.monitoring.coreos.com", "--wait=false", check=False
        )


def _gate(cluster, namespace: str, pod: str) -> str | None:
    body = cluster.api_get(f"/api/v1/namespaces/{namespace}/pods/{pod}")
    return next(
        (c["status"] for c in body["status"].get("conditions", []) if c["type"] == "moefleet.ai/group-ready"),
        None,
    )


def _wait_gates(cluster, namespace: str, pods: list[str], status: str, what: str) -> None:
    """Wait until every pod's group-ready condition has this status."""
    wait_for(lambda: [_gate(cluster, namespace, p) for p in pods] == [status] * len(pods), 30, what)


def _set_containers_ready(cluster, namespace: str, pod: str, ready: bool) -> None:
    """What a kubelet reports when the engine's /health readiness probe starts failing (or recovers)."""
    patch = {"status": {"conditions": [{"type": "ContainersReady", "status": "True" if ready else "False"}]}}
    cluster.kubectl(
        "patch",
        "pod",
        pod,
        "-n",
        namespace,
        "--subresource=status",
        "--type=strategic",
        "-p",
        json.dumps(patch),
    )


def test_readiness_gate_closes_on_every_pod_while_the_group_is_not_ready(
    operator, pool, kube_cluster, kube_namespace
):
    name = "gate"
    kube_cluster.apply(small(name, {"mixed": {"replicas": 1, "nodesPerReplica": 2}}), kube_namespace)
    wait_ready(kube_cluster, kube_namespace, name)
    pods = ["gate-mixed-0-0", "gate-mixed-0-1"]
    _wait_gates(kube_cluster, kube_namespace, pods, "True", "open gates")
    before = pods_by_group(kube_cluster, kube_namespace, name)
    _set_containers_ready(kube_cluster, kube_namespace, "gate-mixed-0-1", False)
    # One node stops being ready: both pods leave the role Service (gate False); nothing is restarted.
    _wait_gates(kube_cluster, kube_namespace, pods, "False", "closed gates")
    body = get_moed(kube_cluster, kube_namespace, name)
    assert body["status"]["groups"][0]["phase"] == "Forming"
    assert condition(body, "Ready")["status"] == "False"
    _set_containers_ready(kube_cluster, kube_namespace, "gate-mixed-0-1", True)
    _wait_gates(kube_cluster, kube_namespace, pods, "True", "reopened gates")
    moed = wait_ready(kube_cluster, kube_namespace, name)
    assert pods_by_group(kube_cluster, kube_namespace, name) == before
    assert "restarts" not in moed["status"]["groups"][0]


def _events(cluster, namespace: str, name: str, reason: str) -> list[dict]:
    items = cluster.api_get(f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name and e["reason"] == reason]


def _engine_env(cluster, namespace: str, sts: str) -> list[dict]:
    body = cluster.api_get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{sts}")
    return body["spec"]["template"]["spec"]["containers"][0]["env"]


def test_hand_edit_of_an_owned_field_is_reverted_with_one_aggregated_event(
    operator, pool, kube_cluster, kube_namespace
):
    """`kubectl patch` of a StatefulSet's env (the spec-hash annotation untouched) is reverted; the group is
    not restarted; the same edit again bumps the DriftCorrected Event's count instead of a new Event."""
    name = "drift"
    kube_cluster.apply(small(name, {"mixed": {"replicas": 1, "nodesPerReplica": 1}}), kube_namespace)
    wait_ready(kube_cluster, kube_namespace, name)
    sts = "drift-mixed-0"
    rendered = _engine_env(kube_cluster, kube_namespace, sts)
    pods = pods_by_group(kube_cluster, kube_namespace, name)
    patch = [
        {"op": "replace", "path": "/spec/template/spec/containers/0/env/0/value", "value": "hand-edited"}
    ]
    for attempt in (1, 2):
        kube_cluster.kubectl(
            "patch", "statefulset", sts, "-n", kube_namespace, "--type=json", "-p", json.dumps(patch)
        )
        wait_for(
            lambda: _engine_env(kube_cluster, kube_namespace, sts) == rendered, 30, f"edit {attempt} reverted"
        )
        wait_for(
            lambda n=attempt: (
                sum(e.get("count", 1) for e in _events(kube_cluster, kube_namespace, name, "DriftCorrected"))
                == n
            ),
            30,
            f"DriftCorrected count {attempt}",
        )
    [event] = _events(kube_cluster, kube_namespace, name, "DriftCorrected")
    assert event["type"] == "Warning" and event["count"] == 2
    assert f"StatefulSet {sts} (spec.template.spec.containers[0].env[0].value)" in event["message"]
    assert event["lastTimestamp"] >= event["firstTimestamp"]
    wait_ready(kube_cluster, kube_namespace, name)
    assert pods_by_group(kube_cluster, kube_namespace, name) == pods  # reverted, never restarted


def _evict(cluster, namespace: str, pod: str) -> subprocess.CompletedProcess:
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
    return cluster.kubectl(
        "create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", "-f", "-",
        input=json.dumps(body), check=False,
    )  # fmt: skip


def _budget(cluster, path: str) -> dict:
    return cluster.api_get(path).get("status", {})


def test_role_budget_lets_a_drain_take_only_one_group_of_a_role_at_a_time(
    operator, pool, kube_cluster, kube_namespace
):
    """The role's PodDisruptionBudget (maxUnavailable 1 over the role, the group-ready gate in every pod's
    readiness) lets a drain evict one pod of group 0; then no pod of group 1 may go while group 0 is down,
    re-forming or starting, but group 0's own pods may (a broken group never blocks a drain); once the
    operator has re-formed group 0 and opened its gates, group 1 may go.

    The pods run on Nodes kwok does not manage, whose kubelet the test plays (support/fake_kubelet.py): kwok
    would finish the eviction and make the recreated pod Ready (its gate opened by itself) at once, so the
    budget could read 4 healthy pods again before the operator has even seen the eviction. Here a pod stays
    Terminating, and a recreated one starting, until the test lets it go, and Ready follows the operator's
    gate as on a real kubelet."""
    name, label = "budget", {"moefleet.test/budget": "yes"}
    nodes = [f"budget-unmanaged-{i}" for i in range(4)]
    for node in nodes:
        kube_cluster.apply(unmanaged_node(node, label))
    heartbeats = [NodeHeartbeat(kube_cluster, node).__enter__() for node in nodes]
    kubelet = FakeKubelet(kube_cluster, kube_namespace, nodes).__enter__()
    pdb_path = f"/apis/policy/v1/namespaces/{kube_namespace}/poddisruptionbudgets/budget-mixed"
    pod_path = f"/api/v1/namespaces/{kube_namespace}/pods/{{}}"
    try:
        kube_cluster.apply(
            small(name, {"mixed": {"replicas": 2, "nodesPerReplica": 2, "nodeSelector": label}}),
            kube_namespace,
        )
        wait_ready(kube_cluster, kube_namespace, name, timeout=180)
        before = pods_by_group(kube_cluster, kube_namespace, name)
        wait_for(
            lambda: _budget(kube_cluster, pdb_path).get("disruptionsAllowed") == 1,
            120,
            "the role budget to allow one disruption",
        )
        kubelet.admit.clear()  # from now on a recreated pod stays starting until the test says
        first = _evict(kube_cluster, kube_namespace, "budget-mixed-0-0")
        assert first.returncode == 0, first.stderr
        # Group 0 is now disrupted (its pod Terminating: the kubelet holds it): no pod of group 1 may go.
        refused = _evict(kube_cluster, kube_namespace, "budget-mixed-1-0")
        assert refused.returncode != 0 and "disruption budget" in refused.stderr, refused.stderr
        wait_for(
            lambda: condition(get_moed(kube_cluster, kube_namespace, name), "Ready").get("status") == "False",
            120,
            "Ready=False while group 0 is down",
        )

        # The operator restarts group 0 (a member is gone): it deletes the other pod or closes its gate, so
        # the pod is unhealthy and the budget lets it go (unhealthyPodEvictionPolicy AlwaysAllow).
        def other_pod_unhealthy() -> bool:
            pod = kube_cluster.api_get(pod_path.format("budget-mixed-0-1"))
            ready = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}.get("Ready")
            return bool(pod["metadata"].get("deletionTimestamp")) or ready == "False"

        wait_for(other_pod_unhealthy, 120, "budget-mixed-0-1 deleted or unready (group 0 restarting)")
        same_group = _evict(kube_cluster, kube_namespace, "budget-mixed-0-1")
        assert same_group.returncode == 0, same_group.stderr
        assert condition(get_moed(kube_cluster, kube_namespace, name), "Available")["status"] == "True"

        # The kubelet finishes the deletions; the StatefulSet recreates group 0, whose pods stay starting.
        kubelet.finish_deletions.set()

        def recreated() -> bool:
            pods = pods_by_group(kube_cluster, kube_namespace, name).get("budget-mixed-0", {})
            old = set(before["budget-mixed-0"].values())
            return len(pods) == 2 and not old & set(pods.values())

        wait_for(recreated, 120, "group 0's pods recreated")
        budget = _budget(kube_cluster, pdb_path)
        assert budget.get("disruptionsAllowed") == 0, budget
        refused = _evict(kube_cluster, kube_namespace, "budget-mixed-1-0")
        assert refused.returncode != 0 and "disruption budget" in refused.stderr, refused.stderr

        # The engines start; the operator opens group 0's gates, the pods turn Ready, and group 1 may go.
        kubelet.admit.set()
        moed = wait_ready(kube_cluster, kube_namespace, name, timeout=180)
        assert condition(moed, "Available")["status"] == "True"
        for pod in pods_by_group(kube_cluster, kube_namespace, name)["budget-mixed-0"]:
            gate = _gate(kube_cluster, kube_namespace, pod)
            assert gate == "True", (pod, gate)
        wait_for(
            lambda: _budget(kube_cluster, pdb_path).get("disruptionsAllowed") == 1,
            120,
            "the budget to recover",
        )
        assert pods_by_group(kube_cluster, kube_namespace, name)["budget-mixed-1"] == before["budget-mixed-1"]
        last = _evict(kube_cluster, kube_namespace, "budget-mixed-1-0")
        assert last.returncode == 0, last.stderr
    finally:
        kubelet.finish_deletions.set()
        kubelet.admit.set()
        kube_cluster.kubectl("delete", "moed", name, "-n", kube_namespace, "--wait=false", check=False)
        try:
            wait_for(lambda: not live_engine_pods(kube_cluster, kube_namespace, name), 60, "engine pods gone")
        except TimeoutError:
            pass  # the Pod garbage collector removes what is left once the nodes are deleted
        kubelet.stop()
        for heartbeat in heartbeats:
            heartbeat.stop()
        kube_cluster.kubectl("delete", "node", *nodes, "--wait=false", check=False)
        kube_cluster.kubectl("delete", "lease", *nodes, "-n", "kube-node-lease", "--wait=false", check=False)


def test_pods_from_an_older_template_are_reformed_to_the_update_revision(
    operator, pool, kube_cluster, kube_namespace
):
    """While the operator is down, a StatefulSet's template is changed and a pod recreated from it. Back up,
    the operator reverts the template (drift) and re-forms the group, whose pod now runs an older revision:
    Ready comes back only when every pod carries the StatefulSet's updateRevision."""
    name = "revision"
    kube_cluster.apply(small(name, {"mixed": {"replicas": 1, "nodesPerReplica": 2}}), kube_namespace)
    wait_ready(kube_cluster, kube_namespace, name)
    sts_path = f"/apis/apps/v1/namespaces/{kube_namespace}/statefulsets/revision-mixed-0"
    original = kube_cluster.api_get(sts_path)["status"]["updateRevision"]
    operator.stop()
    try:
        patch = [{"op": "replace", "path": "/spec/template/spec/containers/0/env/0/value", "value": "other"}]
        kube_cluster.kubectl(
            "patch",
            "statefulset",
            "revision-mixed-0",
            "-n",
            kube_namespace,
            "--type=json",
            "-p",
            json.dumps(patch),
        )
        wait_for(
            lambda: kube_cluster.api_get(sts_path)["status"]["updateRevision"] != original,
            30,
            "a new revision",
        )
        # The rendered pods have a 60 s termination grace (drain); this test needs the pod gone, not drained.
        # A force delete (grace 0) is finished by the API server at once: kwok's fake kubelet, which would
        # finish a graceful one, sometimes took over 120 s to do so on the loaded 2-core machine (the
        # `--grace-period=1 --wait` this test used timed out in 2 of 3 runs).
        kube_cluster.kubectl(
            "delete",
            "pod",
            "revision-mixed-0-1",
            "-n",
            kube_namespace,
            "--grace-period=0",
            "--force",
            "--wait=true",
        )

        def recreated_from_new_template() -> bool:
            pod = kube_cluster.api_get(f"/api/v1/namespaces/{kube_namespace}/pods/revision-mixed-0-1")
            return pod["metadata"]["labels"].get("controller-revision-hash") not in ("", None, original)

        wait_for(recreated_from_new_template, 30, "revision-mixed-0-1 recreated from the edited template")
        kept = pods_by_group(kube_cluster, kube_namespace, name)["revision-mixed-0"]["revision-mixed-0-0"]
    finally:
        operator.start()
    # The status still says Ready from before the stop (the operator has not reconciled yet): waiting for
    # Ready alone returns at once. Wait for the outcome itself: template reverted, observed by the
    # controller, the whole group re-formed (both pods new) at the update revision, and Ready again.
    state: dict = {}

    def reformed() -> bool:
        sts = kube_cluster.api_get(sts_path)
        live = [
            p
            for p in list_items(
                kube_cluster,
                f"/api/v1/namespaces/{kube_namespace}/pods",
                "moefleet.ai/group=revision-mixed-0",
            )
            if not p["metadata"].get("deletionTimestamp")
        ]
        state.update(
            sts=sts.get("status"), pods=[(p["metadata"]["name"], p["metadata"]["labels"]) for p in live]
        )
        return (
            sts["spec"]["template"]["spec"]["containers"][0]["env"][0].get("value") != "other"
            and sts["status"].get("observedGeneration") == sts["metadata"]["generation"]
            and len(live) == 2
            and kept not in {p["metadata"]["uid"] for p in live}
            and all(
                p["metadata"]["labels"].get("controller-revision-hash") == sts["status"]["updateRevision"]
                for p in live
            )
            and is_ready(get_moed(kube_cluster, kube_namespace, name))
        )

    try:
        wait_for(reformed, 150, "the group re-formed at the reverted template's revision and Ready")
    except TimeoutError as error:
        raise AssertionError(f"{error}: {state}") from None
    moed = wait_ready(kube_cluster, kube_namespace, name)
    sts = kube_cluster.api_get(sts_path)
    env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["value"] != "other"  # the template was reverted to the rendered one
    assert sts["status"]["observedGeneration"] == sts["metadata"]["generation"]
    pods = list_items(
        kube_cluster, f"/api/v1/namespaces/{kube_namespace}/pods", "moefleet.ai/group=revision-mixed-0"
    )
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    current = sts["status"]["updateRevision"]
    assert [p["metadata"]["labels"]["controller-revision-hash"] for p in live] == [current, current]
    assert moed["status"]["roles"]["mixed"]["updatedGroups"] == 1
