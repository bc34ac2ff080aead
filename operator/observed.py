"""What the operator sees of its children, reduced to plain data (built from kopf index entries / bodies)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from moefleet.operator import labels as L


@dataclass(frozen=True, slots=True)
class ChildState:
    """One owned object (StatefulSet, Service, PDB, ConfigMap, Deployment, PodMonitor)."""

    kind: str
    name: str
    spec_hash: str
    ready_replicas: int = 0  # Deployments: status.readyReplicas
    replicas: int = 0  # StatefulSets / Deployments: spec.replicas (a group's current size)
    # StatefulSets: the controller's revision for the current template, valid once it has observed the
    # object's latest generation (pods with another controller-revision-hash run an older template).
    update_revision: str = ""
    generation: int = 0
    observed_generation: int = 0
    resource_version: int = 0
    # The live object's labels/annotations and content (spec, data, ...): drift.py compares the fields the
    # operator sets with it. None when unknown (our own write not seen by the watch yet).
    live: Mapping[str, Any] | None = field(default=None, compare=False)
    uid: str = ""
    # uids of its ownerReferences (None: not known, e.g. our own apply not seen by the watch yet): the
    # operator deletes only children its MoEDeployment owns, never by labels alone
    owner_uids: tuple[str, ...] | None = None
    status_replicas: int = 0  # StatefulSets: pods the controller has created (status.replicas)

    @property
    def revision_known(self) -> bool:
        """The StatefulSet controller has processed this spec: update_revision describes it."""
        return bool(self.update_revision) and self.observed_generation >= self.generation


@dataclass(frozen=True, slots=True)
class PodState:
    """One engine pod: enough to decide group health."""

    name: str
    uid: str
    group: str
    ready: bool  # its own containers are ready (ContainersReady; the group gate is not part of it)
    phase: str
    restart_count: int = 0
    deleting: bool = False
    unschedulable: str | None = None  # the scheduler's message when PodScheduled=False/Unschedulable
    failure: str | None = None  # why a container died (termination message / reason / exit code)
    group_ready_gate: bool = False  # GROUP_READY_CONDITION is True on this pod (whoever set it)
    # ... and the operator set it (its reasons): a condition someone else opened (kwok's fake kubelet opens
    # every readiness gate) is taken over, so the gate always reflects the operator's decision.
    gate_by_operator: bool = False
    revision: str = ""  # controller-revision-hash: the StatefulSet template revision it was created from
    node: str = ""  # spec.nodeName
    deletion_deadline: float | None = None  # metadata.deletionTimestamp (epoch seconds) when deleting
    # name of the StatefulSet controlling it ("" when none; None when not known): the operator deletes
    # pods of a group only when the group's StatefulSet owns them, never by labels alone
    owner: str | None = None
    starting: bool = False  # still being created: unscheduled, pulling its image, or containers creating


@dataclass(frozen=True, slots=True)
class Failure:
    """A pod failure seen in a watch event (kept in memory: the failed pod may be gone when we act)."""

    pod: str
    uid: str
    message: str
    seen_at: float


_NOT_CONTENT = ("apiVersion", "kind", "metadata", "status")


def live_content(body: Mapping[str, Any]) -> dict[str, Any]:
    """What drift detection compares: labels, annotations and every content field (spec, data, ...)."""
    metadata = body.get("metadata") or {}
    content = {k: v for k, v in body.items() if k not in _NOT_CONTENT}
    meta = {k: metadata[k] for k in ("labels", "annotations") if metadata.get(k)}
    return copy.deepcopy({"metadata": meta, **content})  # a snapshot: the watch's body may be reused


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def child_state(body: Mapping[str, Any]) -> ChildState:
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    return ChildState(
        kind=body.get("kind", ""),
        name=metadata.get("name", ""),
        spec_hash=(metadata.get("annotations") or {}).get(L.SPEC_HASH, ""),
        ready_replicas=int(status.get("readyReplicas") or 0),
        replicas=int((body.get("spec") or {}).get("replicas") or 0),
        update_revision=str(status.get("updateRevision") or ""),
        generation=_int(metadata.get("generation")),
        observed_generation=_int(status.get("observedGeneration")),
        resource_version=_int(metadata.get("resourceVersion")),
        live=live_content(body),
        uid=str(metadata.get("uid") or ""),
        owner_uids=tuple(str(o.get("uid", "")) for o in metadata.get("ownerReferences") or []),
        status_replicas=_int(status.get("replicas")),
    )


def _termination(statuses: list[Mapping[str, Any]]) -> str | None:
    for container in statuses:
        for key in ("state", "lastState"):
            terminated = (container.get(key) or {}).get("terminated")
            if terminated and (terminated.get("exitCode") or 0) != 0:
                message = (terminated.get("message") or "").strip()
                reason = terminated.get("reason") or "Error"
                head = f"container {container.get('name')} exited {terminated.get('exitCode')} ({reason})"
                return f"{head}: {message}" if message else head
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in ("CrashLoopBackOff", "CreateContainerError", "RunContainerError"):
            return f"container {container.get('name')}: {waiting.get('reason')}: {waiting.get('message', '')}"
    return None


def pod_state(body: Mapping[str, Any]) -> PodState:
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    statuses = list(status.get("containerStatuses") or [])
    scheduled = conditions.get("PodScheduled") or {}
    unschedulable = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "Unschedulable"
    phase = status.get("phase") or "Pending"
    failure = _termination(statuses)
    controller = next((o for o in metadata.get("ownerReferences") or [] if o.get("controller")), None)
    deletion = metadata.get("deletionTimestamp")
    if phase == "Failed" and failure is None:
        failure = f"{status.get('reason') or 'Failed'}: {status.get('message') or 'pod failed'}"
    return PodState(
        name=metadata.get("name", ""),
        uid=metadata.get("uid", ""),
        group=(metadata.get("labels") or {}).get(L.GROUP_LABEL, ""),
        ready=(conditions.get("ContainersReady") or {}).get("status") == "True" and phase == "Running",
        phase=phase,
        restart_count=sum(int(c.get("restartCount") or 0) for c in statuses),
        deleting=bool(metadata.get("deletionTimestamp")),
        unschedulable=unschedulable,
        failure=failure,
        group_ready_gate=(conditions.get(L.GROUP_READY_CONDITION) or {}).get("status") == "True",
        gate_by_operator=(conditions.get(L.GROUP_READY_CONDITION) or {}).get("reason") in L.GATE_REASONS,
        revision=(metadata.get("labels") or {}).get(L.CONTROLLER_REVISION, ""),
        node=str((body.get("spec") or {}).get("nodeName") or ""),
        deletion_deadline=_epoch(deletion) if deletion else None,
        owner=str(controller.get("name", ""))
        if controller and controller.get("kind") == "StatefulSet"
        else "",
        starting=_starting(phase, statuses),
    )


_STARTING_REASONS = ("ContainerCreating", "PodInitializing", "ErrImagePull", "ImagePullBackOff")


def _starting(phase: str, statuses: list[Mapping[str, Any]]) -> bool:
    """Not running its containers yet: Pending (unscheduled, pulling the image) or a container still
    waiting to be created. A slow image pull of a large engine image is the common case."""
    if phase == "Pending":
        return True
    return any(
        ((c.get("state") or {}).get("waiting") or {}).get("reason") in _STARTING_REASONS for c in statuses
    )


def _epoch(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def node_ready(body: Mapping[str, Any]) -> bool:
    """A node the kubelet reports Ready, without the node controller's unreachable/not-ready taints."""
    conditions = {c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []}
    if (conditions.get("Ready") or {}).get("status") != "True":
        return False
    taints = (body.get("spec") or {}).get("taints") or []
    down = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")
    return not any(t.get("key") in down and t.get("effect") == "NoExecute" for t in taints)


def pod_failed(pod: PodState) -> bool:
    """A live pod whose group must restart: it failed, or a container died and was restarted in place."""
    return not pod.deleting and (pod.phase == "Failed" or pod.restart_count > 0 or pod.failure is not None)


# An applied child the watch has not shown yet is trusted for at most this long when its watch's progress is
# unknown (no version from the apply, or a kind without a watch), and at most APPLIED_MAX_AGE otherwise.
APPLIED_TTL = 30.0
APPLIED_MAX_AGE = 600.0


# Seconds the index gets, once its watch has delivered a resourceVersion at or past our write, to show the
# child: kopf runs index functions of different objects concurrently (a thread pool) and stores their results
# later on its event loop, so the highest delivered version is not an exact watermark under load.
WATCH_SETTLE_SECONDS = 15.0


def applied_memo_expired(
    caught_up: bool, version: int, watch_progress: int | None, age: float, passed_for: float | None = None
) -> bool:
    """Stop trusting the memo of a child this operator applied (pure)? The memo stands in for the child until
    the watch (kopf's index) shows it: `caught_up` (the index holds it at >= the applied `version` with the
    applied hash). A watch delivers one resource type's events in resourceVersion order, so once it has
    delivered anything at >= `version` (`watch_progress`, the highest resourceVersion its index function has
    seen; None = not tracked) and the index had `WATCH_SETTLE_SECONDS` to store it (`passed_for`: seconds
    since the progress was first seen past the write), the index is the truth for this child too, present or
    not (e.g. deleted by hand meanwhile). Until then a lagging watch (a loaded operator or API server: minutes
    at 1,000 nodes) must not make the child look missing: that re-applied every child of every deployment and
    posted a second `Created` Event. Without a known version or progress, the old `APPLIED_TTL` rule applies;
    `APPLIED_MAX_AGE` caps the memo in every case."""
    if caught_up:
        return True
    if version <= 0 or watch_progress is None:
        return age > APPLIED_TTL
    passed = watch_progress >= version and passed_for is not None and passed_for >= WATCH_SETTLE_SECONDS
    return passed or age > APPLIED_MAX_AGE
