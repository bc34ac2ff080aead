"""The controller manager's garbage collector deletes dependents whose owner is gone."""

from __future__ import annotations

import pytest
from support.controlplane import ControlPlane, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def _exists(kube_cluster: ControlPlane, namespace: str, kind: str, name: str) -> bool:
    proc = kube_cluster.kubectl("get", kind, "-n", namespace, name, "--ignore-not-found", "-o", "name")
    return bool(proc.stdout.strip())


def test_owner_reference_children_are_collected(kube_cluster: ControlPlane, kube_namespace: str) -> None:
    parent = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "parent"}, "data": {"k": "v"}}
    kube_cluster.apply(parent, kube_namespace)
    uid = kube_cluster.kubectl_json("get", "configmap", "-n", kube_namespace, "parent")["metadata"]["uid"]
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": uid}
    for i in range(3):
        child = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"child-{i}", "ownerReferences": [owner]},
        }
        kube_cluster.apply(child, kube_namespace)
    unowned = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bystander"}}
    kube_cluster.apply(unowned, kube_namespace)

    kube_cluster.kubectl("delete", "configmap", "-n", kube_namespace, "parent", "--cascade=background")
    wait_until(
        lambda: not any(_exists(kube_cluster, kube_namespace, "configmap", f"child-{i}") for i in range(3)),
        60,
        "garbage collection of child-0..2",
        logs=kube_cluster.logs,
    )
    assert _exists(kube_cluster, kube_namespace, "configmap", "bystander")


def test_deployment_deletion_cascades_to_replicaset(kube_cluster: ControlPlane, kube_namespace: str) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 0,  # the ReplicaSet is what we check; no nodes needed
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        },
    }
    kube_cluster.apply(deployment, kube_namespace)

    def replicasets() -> list[str]:
        items = kube_cluster.kubectl_json("get", "replicasets", "-n", kube_namespace, "-l", "app=web")[
            "items"
        ]
        return [rs["metadata"]["name"] for rs in items]

    wait_until(lambda: len(replicasets()) == 1, 60, "the Deployment controller to create a ReplicaSet")
    kube_cluster.kubectl("delete", "deployment", "-n", kube_namespace, "web", "--cascade=background")
    wait_until(
        lambda: not replicasets(), 60, "the ReplicaSet to be garbage collected", logs=kube_cluster.logs
    )
