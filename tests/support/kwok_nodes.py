"""Manifests for fake GPU nodes managed by kwok, and the status patch that makes a pod fail.

Pure functions: they build dicts; the control plane applies them with kubectl.
kwok manages only nodes carrying the annotation `kwok.x-k8s.io/node: fake` (the control plane starts it with
that selector), keeps them Ready (heartbeats/leases) and moves pods bound to them to Running + Ready.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_ANNOTATION_VALUE = "fake"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


def gpu_node(
    name: str,
    *,
    gpus: int = 8,
    gpu_product: str = DEFAULT_GPU_PRODUCT,
    zone: str = "zone-a",
    cpu: str = "192",
    memory: str = "2000Gi",
    pods: int = 110,
    labels: dict[str, str] | None = None,
    taint: bool = False,
    extra_resources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node object like an 8-GPU HGX host with the NVIDIA device plugin and GPU feature discovery.

    Status (capacity/allocatable) is accepted on create for Nodes; kwok's node-initialize stage keeps it.
    `taint=True` adds kwok's usual NoSchedule taint so only pods tolerating it land here.
    """
    resources = {
        "cpu": cpu,
        "memory": memory,
        "pods": str(pods),
        "ephemeral-storage": "10Ti",
        GPU_RESOURCE: str(gpus),
        **(extra_resources or {}),  # e.g. an RDMA device plugin's resource
    }
    node_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        "topology.kubernetes.io/zone": zone,
        "nvidia.com/gpu.product": gpu_product,
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.present": "true",
        **(labels or {}),
    }
    spec: dict[str, Any] = {}
    if taint:
        spec["taints"] = [{"key": KWOK_ANNOTATION, "value": KWOK_ANNOTATION_VALUE, "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node_labels,
            "annotations": {KWOK_ANNOTATION: KWOK_ANNOTATION_VALUE, "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": spec,
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def gpu_nodes(
    n: int, *, prefix: str = "gpu-node", zones: tuple[str, ...] = ("zone-a", "zone-b"), **kw: Any
) -> list[dict[str, Any]]:
    """`n` GPU nodes named `<prefix>-<i>`, spread round-robin over `zones`."""
    if n < 1:
        raise ValueError(f"gpu_nodes: n must be >= 1, got {n}")
    if not zones:
        raise ValueError("gpu_nodes: zones must name at least one zone")
    return [gpu_node(f"{prefix}-{i}", zone=zones[i % len(zones)], **kw) for i in range(n)]


def node_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": items}


def failed_pod_status(
    pod: dict[str, Any], message: str, *, exit_code: int = 1, reason: str = "Error"
) -> dict[str, Any]:
    """A status patch that makes `pod` look like its containers exited with `exit_code` and `message`.

    What a kubelet reports when a container dies and the pod will not restart in place. kwok leaves it
    alone afterwards: its pod-ready stage only acts on pods without a podIP.
    """
    containers = pod.get("spec", {}).get("containers", [])
    if not containers:
        raise ValueError("failed_pod_status: the pod has no spec.containers")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    statuses = [
        {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "started": False,
            "state": {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason,
                    "message": message,
                    "startedAt": now,
                    "finishedAt": now,
                }
            },
        }
        for c in containers
    ]
    return {
        "status": {
            "phase": "Failed",
            "reason": reason,
            "message": message,
            "containerStatuses": statuses,
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "PodFailed"},
                {"type": "ContainersReady", "status": "False", "reason": "PodFailed"},
            ],
        }
    }
