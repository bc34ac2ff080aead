"""The scheduler places GPU pods on kwok GPU nodes, kwok makes them Ready, and unfit pods stay Pending."""

from __future__ import annotations

from typing import Any

import pytest
from support.controlplane import ControlPlane, wait_until
from support.kwok_nodes import DEFAULT_GPU_PRODUCT, GPU_RESOURCE, KWOK_ANNOTATION, KWOK_ANNOTATION_VALUE

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

NODES = 16
# The session's cluster is shared with other test modules (tests/operator creates its own GPU nodes), so
# this module's nodes are labelled and tainted: only its pods (selector + toleration) land there, and only there.
POOL = {"moefleet.test/pool": "cluster-scheduling"}
TOLERATION = {
    "key": KWOK_ANNOTATION,
    "operator": "Equal",
    "value": KWOK_ANNOTATION_VALUE,
    "effect": "NoSchedule",
}


@pytest.fixture(scope="module")
def gpu_nodes(kube_cluster: ControlPlane) -> list[str]:
    return kube_cluster.create_gpu_nodes(NODES, prefix="sched-gpu", labels=POOL, taint=True)


def gpu_statefulset(name: str, replicas: int, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.product": DEFAULT_GPU_PRODUCT, **POOL},
                    "tolerations": [TOLERATION],
                    "containers": [
                        {
                            "name": "engine",
                            "image": "moefleet/engine:test",
                            "resources": {"limits": {GPU_RESOURCE: str(gpus)}, "requests": {"cpu": "1"}},
                        }
                    ],
                },
            },
        },
    }


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_statefulset_of_8_gpu_pods_is_scheduled_one_per_node_and_ready(
    kube_cluster: ControlPlane, kube_namespace: str, gpu_nodes: list[str]
) -> None:
    replicas = 4
    sts = gpu_statefulset("moe", replicas, gpus=8)
    kube_cluster.apply(sts, kube_namespace)

    def all_ready() -> bool:
        got = kube_cluster.kubectl_json("get", "statefulset", "-n", kube_namespace, "moe")
        return int(got["status"].get("readyReplicas", 0)) == replicas

    wait_until(all_ready, 120, "StatefulSet moe to have 4 ready replicas", logs=kube_cluster.logs)
    pods = kube_cluster.kubectl_json("get", "pods", "-n", kube_namespace, "-l", "app=moe")["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == [f"moe-{i}" for i in range(replicas)]
    nodes = [p["spec"]["nodeName"] for p in pods]
    # 8 GPUs per pod on 8-GPU nodes: the scheduler must put each pod on its own node.
    assert len(set(nodes)) == replicas, nodes
    assert set(nodes) <= set(gpu_nodes)
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert _ready(pod), pod["status"]
        node = kube_cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
        assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == DEFAULT_GPU_PRODUCT


def test_pod_wanting_more_gpus_than_any_node_stays_pending_with_scheduler_reason(
    kube_cluster: ControlPlane, kube_namespace: str, gpu_nodes: list[str]
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big"},
        "spec": {
            "containers": [{"name": "c", "image": "x", "resources": {"limits": {GPU_RESOURCE: "9"}}}],
            "tolerations": [TOLERATION],
        },
    }
    kube_cluster.apply(pod, kube_namespace)
    seen: dict[str, Any] = {}

    def unschedulable() -> bool:
        got = kube_cluster.kubectl_json("get", "pod", "-n", kube_namespace, "too-big")
        for cond in got["status"].get("conditions", []):
            if cond["type"] == "PodScheduled" and cond["status"] == "False":
                seen.update(cond, phase=got["status"]["phase"], node=got["spec"].get("nodeName"))
                return True
        return False

    wait_until(unschedulable, 60, "PodScheduled=False on pod too-big", logs=kube_cluster.logs)
    assert seen["reason"] == "Unschedulable"
    assert f"Insufficient {GPU_RESOURCE}" in seen["message"]
    assert seen["phase"] == "Pending" and seen["node"] is None


def test_failed_pod_is_replaced_by_its_statefulset(
    kube_cluster: ControlPlane, kube_namespace: str, gpu_nodes: list[str]
) -> None:
    sts = gpu_statefulset("grp", 2, gpus=8)
    kube_cluster.apply(sts, kube_namespace)

    def ready_count() -> int:
        got = kube_cluster.kubectl_json("get", "statefulset", "-n", kube_namespace, "grp")
        return int(got["status"].get("readyReplicas", 0))

    wait_until(lambda: ready_count() == 2, 120, "StatefulSet grp ready", logs=kube_cluster.logs)
    before = kube_cluster.kubectl_json("get", "pod", "-n", kube_namespace, "grp-1")
    kube_cluster.fail_pod(kube_namespace, "grp-1", "CUDA error: an illegal memory access was encountered")

    failed = kube_cluster.kubectl_json("get", "pod", "-n", kube_namespace, "grp-1")
    # Either we still see the failed pod, or the StatefulSet controller already replaced it.
    if failed["metadata"]["uid"] == before["metadata"]["uid"]:
        assert failed["status"]["phase"] == "Failed"
        term = failed["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["message"] == "CUDA error: an illegal memory access was encountered"
        assert term["exitCode"] == 1

    def replaced_and_ready() -> bool:
        pod = kube_cluster.kubectl_json("get", "pod", "-n", kube_namespace, "grp-1")
        return pod["metadata"]["uid"] != before["metadata"]["uid"] and _ready(pod)

    wait_until(replaced_and_ready, 120, "grp-1 recreated and Ready", logs=kube_cluster.logs)
    # The sibling was not touched.
    assert (
        kube_cluster.kubectl_json("get", "pod", "-n", kube_namespace, "grp-0")["status"]["phase"] == "Running"
    )
