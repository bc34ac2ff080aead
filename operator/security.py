"""Pod isolation defaults and the model-volume policy: pure functions.

Engine and gateway pods run with no service-account token (they never call the Kubernetes API), seccomp
RuntimeDefault, as the image's non-root user (uid 65532, Dockerfile), with a read-only root filesystem
(writable: /tmp and /dev/shm emptyDirs), no privilege escalation and every capability dropped. RDMA needs
IPC_LOCK (pinned memory) and sometimes root or privileged: grant those through the pod template overlay
(docs/operator.md "Running on a real cluster"), never by default.

`spec.model.volume` with hostPath gives pods a node directory; it is refused unless the operator runs with
MOEFLEET_OPERATOR_ALLOW_HOST_PATH=true (chart: operator.allowHostPath).
"""

from __future__ import annotations

from typing import Any

from moefleet.operator.spec import MoEDeploymentSpec, SpecError

Obj = dict[str, Any]

RUN_AS_USER = 65532  # the image's `moefleet` user


def pod_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        # No fsGroup: it would make the kubelet chown the model volume (hundreds of GB) at every start; the
        # emptyDirs are world-writable and checkpoints are world-readable.
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def tmp_volume() -> tuple[Obj, Obj]:
    """A writable /tmp (caches, Triton, sockets) under the read-only root filesystem: (volume, mount)."""
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def check_model_volume(spec: MoEDeploymentSpec, allow_host_path: bool) -> None:
    """Refuse spec.model.volume.hostPath unless the operator allows it (a node directory in every pod)."""
    if spec.model.volume and "hostPath" in spec.model.volume and not allow_host_path:
        raise SpecError(
            "spec.model.volume.hostPath",
            "hostPath volumes are disabled on this operator; use spec.model.pvc (a ReadOnlyMany claim), "
            "or ask the cluster admin to set the chart's operator.allowHostPath=true",
        )
