"""What a multi-node engine pod needs, rendered by default: pure functions of the spec.

- /dev/shm: a memory-backed emptyDir of `spec.roles.<role>.shmSize`, default SHM_GIB_PER_GPU GiB per GPU
  (NCCL's shared-memory transport, DeepEP's host buffers and the data loader use it; Docker's 64 MiB default
  makes NCCL fail at start-up). It counts against the pod's memory.
- CPU and memory requests: CPU_PER_GPU cores and MEMORY_GIB_PER_GPU GiB per GPU unless the role sets them
  (a GPU node is useless to other pods anyway; requests keep the scheduler from packing CPU pods next to it).
- NCCL / NVSHMEM / cache environment (ENV_DEFAULTS, documented in docs/operator.md); spec.env and the pod
  template overlay override any of them by name.
- Startup probe sized from the checkpoint size (spec.model.sizeGB): STARTUP_BASE_S for process start,
  NCCL init and warm-up + sizeGB / STARTUP_READ_GBPS for reading the weights; without a size, one hour.
- Liveness on GET /health/progress (engine/server/progress.py): it fails when requests wait but no engine
  step completed for the engine's --progress-timeout, i.e. a hung collective or kernel, which /health (the
  socket answers) does not see.
"""

from __future__ import annotations

import math
from typing import Any

from moefleet.operator.spec import MoEDeploymentSpec, RoleSpec

Obj = dict[str, Any]

SHM_GIB_PER_GPU = 4
CPU_PER_GPU = 8
MEMORY_GIB_PER_GPU = 64
PROGRESS_PATH = "/health/progress"
PROBE_PERIOD_S = 10
STARTUP_BASE_S = 600.0
STARTUP_READ_GBPS = 0.5  # a conservative shared-filesystem read rate (local NVMe is 5-10x faster)
STARTUP_DEFAULT_S = 3600.0
STARTUP_MAX_S = 4 * 3600.0
LIVENESS_FAILURES = 6  # 60 s of failed progress checks on top of the engine's own stall window

# (name, value, why). Overridable by spec.env or the overlay (same name).
ENV_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("NCCL_DEBUG", "WARN", "NCCL prints errors and warnings only"),
    (
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "1",
        "a failed or timed-out collective aborts the process (the group restarts) instead of hanging",
    ),
    ("NCCL_IB_TIMEOUT", "22", "InfiniBand retransmission timeout exponent (4.096 us * 2^22 ~ 17 s)"),
    ("NVSHMEM_IB_ENABLE_IBGDA", "1", "GPU-initiated RDMA for DeepEP's low-latency internode kernels"),
    ("HOME", "/tmp", "the root filesystem is read-only; caches go to the /tmp emptyDir"),
    ("XDG_CACHE_HOME", "/tmp/.cache", "Hugging Face, pip and torch caches"),
    ("TRITON_CACHE_DIR", "/tmp/.triton", "compiled Triton kernels"),
)


def shm_size(role: RoleSpec) -> str:
    return role.shm_size or f"{role.gpus_per_node * SHM_GIB_PER_GPU}Gi"


def default_requests(role: RoleSpec) -> Obj:
    """The role's resources with CPU/memory requests filled in where it sets none."""
    resources: Obj = {key: dict(value) for key, value in (role.resources or {}).items()}
    requests = resources.setdefault("requests", {})
    requests.setdefault("cpu", str(role.gpus_per_node * CPU_PER_GPU))
    requests.setdefault("memory", f"{role.gpus_per_node * MEMORY_GIB_PER_GPU}Gi")
    return resources


def default_env(user_env: tuple[Any, ...]) -> list[Obj]:
    """ENV_DEFAULTS minus the names spec.env sets."""
    taken = {item.get("name") for item in user_env}
    return [{"name": name, "value": value} for name, value, _ in ENV_DEFAULTS if name not in taken]


def startup_seconds(spec: MoEDeploymentSpec) -> float:
    if spec.model.size_gb is None:
        return STARTUP_DEFAULT_S
    return min(STARTUP_BASE_S + spec.model.size_gb / STARTUP_READ_GBPS, STARTUP_MAX_S)


def startup_probe(spec: MoEDeploymentSpec, health_path: str) -> Obj:
    return {
        "httpGet": {"path": health_path, "port": "http"},
        "periodSeconds": PROBE_PERIOD_S,
        "failureThreshold": math.ceil(startup_seconds(spec) / PROBE_PERIOD_S),
    }


def liveness_probe() -> Obj:
    return {
        "httpGet": {"path": PROGRESS_PATH, "port": "http"},
        "periodSeconds": PROBE_PERIOD_S,
        "timeoutSeconds": 5,
        "failureThreshold": LIVENESS_FAILURES,
    }


def model_secret_env(spec: MoEDeploymentSpec) -> list[Obj]:
    """spec.model.secretRef -> envFrom (every key becomes a variable; the operator never reads it)."""
    return [{"secretRef": {"name": spec.model.secret_ref}}] if spec.model.secret_ref else []
