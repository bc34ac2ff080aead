"""Gang placement and topology: pure decisions and renders (handlers.py detects the CRDs and applies).

A group's pods form one torch.distributed world: a partly scheduled group holds GPUs and serves nothing. When
a gang scheduler is installed (its CRDs exist, detected like the PodMonitor CRD), each group becomes one gang:
- Kueue (workloads.kueue.x-k8s.io, used only when spec.gangScheduling.queueName names a LocalQueue): the
  StatefulSet and its pods carry `kueue.x-k8s.io/queue-name`; Kueue's StatefulSet integration admits the
  whole StatefulSet as one pod group (all pods or none).
- Volcano (podgroups.scheduling.volcano.sh): a PodGroup per group with minMember = nodesPerReplica, pods
  annotated `scheduling.k8s.io/group-name` and scheduled by `volcano`.
- scheduler-plugins coscheduling (podgroups.scheduling.x-k8s.io): a PodGroup per group with minMember =
  nodesPerReplica and pods labelled `scheduling.x-k8s.io/pod-group`. The coscheduling scheduler usually runs
  as a second scheduler: set its name with the pod template overlay (spec.podTemplate.spec.schedulerName).
Otherwise (or spec.gangScheduling.mode off) placement is best effort and status.placement says so.

Topology: `spec.topologyKey` / `spec.roles.<role>.topologyKey` (e.g. an InfiniBand fabric or rack label)
adds a *required* pod affinity among a group's pods on that key, so a group lands inside one domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moefleet.operator import labels as L
from moefleet.operator.spec import MoEDeploymentSpec, RoleSpec

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class GangBackend:
    name: str
    crd: str
    api_version: str  # of the PodGroup ("" when the backend needs no object of ours)
    plural: str


KUEUE = GangBackend("kueue", "workloads.kueue.x-k8s.io", "", "")
VOLCANO = GangBackend(
    "volcano", "podgroups.scheduling.volcano.sh", "scheduling.volcano.sh/v1beta1", "podgroups"
)
COSCHEDULING = GangBackend(
    "coscheduling", "podgroups.scheduling.x-k8s.io", "scheduling.x-k8s.io/v1alpha1", "podgroups"
)
BACKENDS = (KUEUE, VOLCANO, COSCHEDULING)  # preference order
BY_NAME = {backend.name: backend for backend in BACKENDS}

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
VOLCANO_SCHEDULER = "volcano"
COSCHEDULING_LABEL = "scheduling.x-k8s.io/pod-group"
POD_GROUP_TIMEOUT_S = 600  # coscheduling: a gang not fully placed within this releases what it holds


def choose_backend(spec: MoEDeploymentSpec, installed_crds: set[str]) -> GangBackend | None:
    """The gang scheduler to use, or None (best effort). Kueue needs a queue name; then Volcano, coscheduling."""
    if spec.gang.mode == "off":
        return None
    for backend in BACKENDS:
        if backend.crd not in installed_crds:
            continue
        if backend is KUEUE and not spec.gang.queue_name:
            continue
        return backend
    return None


def placement_status(spec: MoEDeploymentSpec, backend: GangBackend | None) -> Obj:
    """status.placement: which gang scheduler places the groups (or why placement is best effort)."""
    if backend is not None:
        return {"gangScheduler": backend.name, "message": f"each group is one gang ({backend.name})"}
    why = (
        "spec.gangScheduling.mode is off"
        if spec.gang.mode == "off"
        else "no gang scheduler found (Kueue with spec.gangScheduling.queueName, Volcano or coscheduling)"
    )
    return {
        "gangScheduler": "none",
        "message": f"best effort: {why}; a group may be partly scheduled and hold GPUs while it waits",
    }


def workload_labels(spec: MoEDeploymentSpec, backend: GangBackend | None) -> dict[str, str]:
    """Labels on a group's StatefulSet (Kueue reads the queue from the workload object)."""
    if backend is KUEUE and spec.gang.queue_name:
        return {KUEUE_QUEUE_LABEL: spec.gang.queue_name}
    return {}


def pod_gang_fields(
    spec: MoEDeploymentSpec, role: RoleSpec, replica: int, backend: GangBackend | None
) -> tuple[dict[str, str], dict[str, str], str | None]:
    """(pod labels, pod annotations, schedulerName or None) that put a group's pods into its gang."""
    group = L.group_name(spec.name, role.name, replica)
    if backend is KUEUE:
        return workload_labels(spec, backend), {}, None
    if backend is VOLCANO:
        return {}, {VOLCANO_GROUP_ANNOTATION: group}, VOLCANO_SCHEDULER
    if backend is COSCHEDULING:
        return {COSCHEDULING_LABEL: group}, {}, None
    return {}, {}, None


def render_pod_group(
    spec: MoEDeploymentSpec, role: RoleSpec, replica: int, backend: GangBackend | None
) -> Obj | None:
    """The group's PodGroup (unfinished: render.py adds namespace, owner and hash), or None."""
    if backend is None or not backend.api_version:
        return None
    group = L.group_name(spec.name, role.name, replica)
    body: Obj = {"minMember": role.nodes_per_replica}
    if backend is COSCHEDULING:
        body["scheduleTimeoutSeconds"] = POD_GROUP_TIMEOUT_S
    return {
        "apiVersion": backend.api_version,
        "kind": "PodGroup",
        "metadata": {"name": group, "labels": L.group_labels(spec.name, role.name, replica)},
        "spec": body,
    }


def topology_key(spec: MoEDeploymentSpec, role: RoleSpec) -> str | None:
    return role.topology_key or spec.topology_key


def with_topology(affinity: Obj, spec: MoEDeploymentSpec, role: RoleSpec, replica: int) -> Obj:
    """`affinity` plus a required pod affinity among the group's pods on the role's topology key."""
    key = topology_key(spec, role)
    if key is None:
        return affinity
    term = {
        "labelSelector": {"matchLabels": {L.GROUP_LABEL: L.group_name(spec.name, role.name, replica)}},
        "topologyKey": key,
    }
    pod_affinity = dict(affinity.get("podAffinity") or {})
    required = list(pod_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
    pod_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = [*required, term]
    return {**affinity, "podAffinity": pod_affinity}
