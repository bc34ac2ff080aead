"""Scale variant: 200 fake GPU nodes come Ready and a large GPU StatefulSet lands on them."""

from __future__ import annotations

import time

import pytest
from support.controlplane import ControlPlane, wait_until
from support.kwok_nodes import KWOK_ANNOTATION

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

NODES = 200
REPLICAS = 64


def test_200_gpu_nodes_take_a_64_pod_statefulset(kube_cluster: ControlPlane, kube_namespace: str) -> None:
    t0 = time.monotonic()
    try:
        names = kube_cluster.create_gpu_nodes(
            NODES, prefix="scale", labels={"moefleet.test/pool": "scale"}, taint=True, timeout_s=300
        )
        nodes_ready_s = time.monotonic() - t0
        sts = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "wide"},
            "spec": {
                "replicas": REPLICAS,
                "serviceName": "wide",
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": {"app": "wide"}},
                "template": {
                    "metadata": {"labels": {"app": "wide"}},
                    "spec": {
                        "nodeSelector": {"moefleet.test/pool": "scale"},
                        # The nodes are tainted so no other test's pods land on nodes this test deletes.
                        "tolerations": [
                            {"key": KWOK_ANNOTATION, "operator": "Exists", "effect": "NoSchedule"}
                        ],
                        "containers": [
                            {"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "8"}}}
                        ],
                    },
                },
            },
        }
        kube_cluster.apply(sts, kube_namespace)

        def ready() -> int:
            got = kube_cluster.kubectl_json("get", "statefulset", "-n", kube_namespace, "wide")
            return int(got["status"].get("readyReplicas", 0))

        wait_until(
            lambda: ready() == REPLICAS,
            300,
            f"{REPLICAS} ready replicas",
            interval_s=1.0,
            logs=kube_cluster.logs,
        )
        pods = kube_cluster.kubectl_json("get", "pods", "-n", kube_namespace, "-l", "app=wide")["items"]
        placed = [p["spec"]["nodeName"] for p in pods]
        assert len(set(placed)) == REPLICAS and set(placed) <= set(names)
        print(
            f"{NODES} nodes Ready in {nodes_ready_s:.1f}s; {REPLICAS} pods Ready in {time.monotonic() - t0:.1f}s total"
        )
    finally:
        kube_cluster.kubectl(
            "delete",
            "statefulset",
            "-n",
            kube_namespace,
            "wide",
            "--ignore-not-found",
            "--wait=false",
            check=False,
        )
        kube_cluster.delete_nodes("moefleet.test/pool=scale")
