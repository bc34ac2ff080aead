"""Pure decisions: given the desired objects, what is observed and the previous status, what to do now.

`plan` returns a Plan (objects to apply, objects to delete, groups whose pods to delete, events, the new
status); `moefleet.operator.kube` executes it. Nothing here calls the API or reads the clock (`now` is an
argument), so every decision is unit-tested (tests/operator/test_planner.py).

Group rules (DESIGN.md "Operator contracts"):
- A group is all-or-nothing: any pod failed / restarted in place / replaced => delete all its pods together,
  first restart immediately, then exponential backoff (base * 2^(n-1), capped) and at most maxRestarts per
  window (then the group stays down and Degraded says so until the window slides).
- A changed StatefulSet (nodesPerReplica, image, args, ...) re-forms its group: broken groups at once,
  serving groups one at a time and only while every other group is Ready.
- Scaling adds/removes whole groups and leaves the others untouched.
- Drift: a child whose live fields differ from the rendered ones on a field the operator sets (drift.py) is
  re-applied, with a DriftCorrected Warning.
- Rollouts are measured: a group runs the current spec when its StatefulSet is the rendered one, the
  StatefulSet controller has observed it, and every pod carries its updateRevision. A group whose pods are
  on an older revision (e.g. the operator stopped between applying the StatefulSet and deleting the pods) is
  re-formed like a changed one.
- Events: one per decision (all children created in this pass -> one Created event), not one per child;
  none for a new MoEDeployment's first pass (creating every child is what creating it means).
- Never stuck: a pod on a NotReady (or vanished) node makes its group not Ready at once; a pod still
  Terminating `force_delete_after` seconds past its deletion deadline on such a node is force-deleted
  (grace 0, uid precondition) so the StatefulSet can recreate it. Children are deleted only when the
  MoEDeployment owns them (ownerReferences uid), pods only when their group's StatefulSet does.
- Start-up grace: while a (re)created group is within `restartPolicy.startupGrace` and one of its pods is
  still starting (unscheduled, pulling its image), a failure of another pod does not restart the group
  (that pod's kubelet restarts it in place); the restart, if still needed, comes when every pod has
  started or the grace is over, so a slow image pull cannot cause a restart loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moefleet.operator import labels as L
from moefleet.operator.drift import drifted_fields
from moefleet.operator.observed import ChildState, Failure, PodState, pod_failed
from moefleet.operator.spec import MoEDeploymentSpec, RestartPolicySpec
from moefleet.operator.status import (
    BACKOFF,
    FAILED,
    FORMING,
    PENDING,
    READY,
    RESTARTING,
    UNSCHEDULABLE,
    UPDATING,
    Event,
    build_status,
    parse_timestamp,
    timestamp,
)

Obj = dict[str, Any]


@dataclass(slots=True)
class Plan:
    apply: list[Obj] = field(default_factory=list)  # create or update (server-side apply)
    delete: list[ChildState] = field(default_factory=list)  # owned objects no longer wanted
    delete_pods: dict[str, list[str]] = field(default_factory=dict)  # group -> its pod names
    pod_gates: list[tuple[str, bool]] = field(default_factory=list)  # (pod, group-ready condition to set)
    # pods in pod_gates whose gate another writer opened and that the operator closes (never on a real
    # kubelet; kwok's fake kubelet opens every gate): counted apart so benchmarks can tell them from real cost
    foreign_gates: set[str] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)
    status: Obj = field(default_factory=dict)
    pod_uids: dict[str, str] = field(default_factory=dict)  # pod name -> uid: the deletes' precondition
    force_delete: list[tuple[str, str]] = field(default_factory=list)  # (pod, uid) stuck Terminating

    @property
    def writes(self) -> int:
        pods = sum(len(p) for p in self.delete_pods.values())
        return len(self.apply) + len(self.delete) + pods + len(self.pod_gates) + len(self.force_delete)


@dataclass(frozen=True, slots=True)
class RestartDecision:
    allowed: bool
    reason: str  # "" | "BackOff" | "RestartLimit"
    not_before: float | None = None  # when the next restart may happen (None = now)


def restart_decision(
    restart_times: Sequence[float], policy: RestartPolicySpec, now: float
) -> RestartDecision:
    """May a failed group restart now? First restart at once, then exponential backoff, bounded per window."""
    recent = sorted(t for t in restart_times if now - t < policy.window_seconds)
    if len(recent) >= policy.max_restarts:
        # Out of restarts: wait until the oldest one in the window slides out.
        return RestartDecision(False, "RestartLimit", recent[-policy.max_restarts] + policy.window_seconds)
    if not recent:
        return RestartDecision(True, "")
    delay = min(policy.backoff_base_seconds * 2 ** (len(recent) - 1), policy.backoff_max_seconds)
    not_before = recent[-1] + delay
    if now < not_before:
        return RestartDecision(False, "BackOff", not_before)
    return RestartDecision(True, "")


def members_hash(uids: Sequence[str]) -> str:
    return hashlib.sha256(",".join(sorted(uids)).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class GroupView:
    """A group's pods as seen now, minus the ones the operator already deleted (`retired` uids)."""

    name: str
    nodes: int
    pods: tuple[PodState, ...]

    @property
    def ready(self) -> bool:
        return len(self.pods) == self.nodes and all(p.ready for p in self.pods)

    @property
    def ready_nodes(self) -> int:
        return sum(p.ready for p in self.pods)

    @property
    def unschedulable(self) -> str | None:
        return next((p.unschedulable for p in self.pods if p.unschedulable), None)


def _group_view(
    name: str, nodes: int, pods: Sequence[PodState], retired: Sequence[str], node_ok: Any = None
) -> GroupView:
    """`node_ok(node)`: False for a NotReady/vanished node; its pods count as not Ready at once."""
    live = sorted((p for p in pods if not p.deleting and p.uid not in retired), key=lambda p: p.name)
    if node_ok is not None:
        live = [p if not p.ready or node_ok(p.node) else dataclasses.replace(p, ready=False) for p in live]
    return GroupView(name, nodes, tuple(live))


def _failure(view: GroupView, record: Mapping[str, Any], failure: Failure | None) -> str | None:
    """Why this group must restart, or None. Uses pods, the failure memo and the recorded membership."""
    for pod in view.pods:
        if pod_failed(pod):
            return f"pod {pod.name}: {pod.failure or f'restarted {pod.restart_count} time(s)'}"
    last_restart = parse_timestamp(record["lastRestartTime"]) if record.get("lastRestartTime") else 0.0
    # A failure seen before (or in the same second as) the last restart was already acted on.
    if (
        failure is not None
        and failure.seen_at >= last_restart + 1
        and failure.uid not in record.get("retired", [])
    ):
        return f"pod {failure.pod}: {failure.message}"
    # The membership recorded when the group was last Ready (cleared when the operator restarts or
    # re-forms it): a pod gone or replaced since - also while the group is not Ready, e.g. its node went
    # NotReady and the pod was evicted - means the group must form again, all together.
    members = record.get("members")
    if members and members_hash([p.uid for p in view.pods]) != members:
        return "a pod of the group disappeared or was replaced"
    return None


@dataclass(frozen=True, slots=True)
class Observed:
    """Everything `plan` reads about the cluster."""

    children: Mapping[tuple[str, str], ChildState]  # (kind, name) -> state
    pods: Mapping[str, Sequence[PodState]]  # group name -> its pods
    failures: Mapping[str, Failure] = field(default_factory=dict)  # group name -> latest failure seen
    # node name -> Ready (observed.node_ready); None = nodes not watched (every node counts as Ready)
    node_ready: Mapping[str, bool] | None = None
    # group -> the StatefulSet controller's FailedCreate message (quota, Pod Security admission, ...)
    create_failures: Mapping[str, str] = field(default_factory=dict)


def plan(
    spec: MoEDeploymentSpec,
    desired: Sequence[Obj],
    observed: Observed,
    previous_status: Mapping[str, Any],
    now: float,
    managed_kinds: Sequence[str] = (
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
    ),
    force_delete_after: float = 300.0,
) -> Plan:
    """Decide this reconcile's writes and the resulting status (see the module docstring for the rules)."""
    out = Plan()
    desired_by_key = {(obj["kind"], obj["metadata"]["name"]): obj for obj in desired}
    hashes = {key: obj["metadata"]["annotations"][L.SPEC_HASH] for key, obj in desired_by_key.items()}

    # 1. Children that are not StatefulSets: apply when missing, different or drifted; delete when unwanted.
    decisions: dict[str, list[str]] = {}  # event reason -> what it concerns (one Event per reason)
    drift: list[str] = []
    for key, obj in desired_by_key.items():
        if key[0] == "StatefulSet":
            continue
        seen = observed.children.get(key)
        if seen is None or seen.spec_hash != hashes[key]:
            out.apply.append(obj)
            decisions.setdefault("Created" if seen is None else "Updated", []).append(f"{key[0]} {key[1]}")
        elif seen.live is not None and (fields := drifted_fields(obj, seen.live)):
            out.apply.append(obj)
            drift.append(f"{key[0]} {key[1]} ({', '.join(fields[:3])})")
    for key, seen in sorted(observed.children.items()):
        owned = seen.owner_uids is None or not spec.uid or spec.uid in seen.owner_uids
        if key not in desired_by_key and key[0] in managed_kinds and owned:
            out.delete.append(seen)
            decisions.setdefault("Deleted", []).append(f"{key[0]} {key[1]}")

    # 2. Groups.
    node_ready = observed.node_ready

    def node_ok(node: str) -> bool:
        return node_ready is None or not node or node_ready.get(node, False)

    previous_groups = {g["name"]: g for g in previous_status.get("groups") or []}
    groups: list[Obj] = []
    views: dict[str, GroupView] = {}
    outdated: list[str] = []
    current: dict[str, bool] = {}
    rolled_out_by_pods: set[str] = set()  # outdated only by their pods' revision (the StatefulSet is current)
    for role in spec.roles:
        for replica in range(role.replicas):
            name = L.group_name(spec.name, role.name, replica)
            record = dict(previous_groups.get(name) or {})
            seen = observed.children.get(("StatefulSet", name))
            is_outdated = seen is not None and seen.spec_hash != hashes[("StatefulSet", name)]
            # An outdated group still runs its old size until it is re-formed.
            nodes = (
                (seen.replicas or role.nodes_per_replica)
                if seen is not None and is_outdated
                else role.nodes_per_replica
            )
            view = _group_view(name, nodes, observed.pods.get(name, ()), record.get("retired", []), node_ok)
            views[name] = view
            record.update(name=name, role=role.name, replica=replica, nodes=nodes)
            if "phase" not in record:  # a new group: its start-up grace starts now
                record.setdefault("formingSince", timestamp(now))
            desired_sts = desired_by_key[("StatefulSet", name)]
            drifted = (
                drifted_fields(desired_sts, seen.live)
                if seen is not None and not is_outdated and seen.live is not None
                else []
            )
            if seen is None:
                out.apply.append(desired_sts)
                decisions.setdefault("Created", []).append(f"StatefulSet {name} (group of {nodes} nodes)")
            elif is_outdated:
                outdated.append(name)
            elif drifted:
                out.apply.append(desired_sts)
                drift.append(f"StatefulSet {name} ({', '.join(drifted[:3])})")
            elif seen.revision_known and any(
                p.revision and p.revision != seen.update_revision for p in view.pods
            ):
                outdated.append(name)  # the StatefulSet is current but its pods were made from an older one
                rolled_out_by_pods.add(name)
            # Measured: the rendered StatefulSet, observed by its controller, every pod at its revision.
            current[name] = (
                seen is not None
                and not is_outdated
                and not drifted
                and seen.revision_known
                and all(p.revision == seen.update_revision for p in view.pods)
            )
            groups.append(record)

    # 2a. Re-form changed groups: broken ones at once, serving ones one at a time while all others are Ready.
    reforming: set[str] = set()
    for name in outdated:
        others_ready = all(v.ready for n, v in views.items() if n != name and n not in reforming)
        if views[name].ready and (reforming or not others_ready):
            continue  # keeps serving with its old spec; Progressing says it waits
        reforming.add(name)
        if name not in rolled_out_by_pods:
            out.apply.append(desired_by_key[("StatefulSet", name)])
        decisions.setdefault("ReformingGroup", []).append(name)
        if views[name].pods:
            out.delete_pods[name] = [p.name for p in views[name].pods]

    # 2b. Health of each group -> phase, restarts.
    policy = spec.restart_policy
    for record in groups:
        name = record["name"]
        view = views[name]
        retired = list(record.get("retired", []))
        if name in reforming:
            record.update(phase=UPDATING, members="", retired=sorted({*retired, *(p.uid for p in view.pods)}))
            record["formingSince"] = timestamp(now)
            record["nodes"] = spec.role(record["role"]).nodes_per_replica
            record["readyNodes"] = 0
            continue
        record["readyNodes"] = view.ready_nodes
        reason = _failure(view, record, observed.failures.get(name))
        if reason is not None and _in_startup_grace(view, record, policy, now):
            record["phase"] = FORMING  # a peer still pulls its image: do not restart (see module doc)
            continue
        if reason is not None:
            times = [parse_timestamp(t) for t in record.get("restartTimes", [])]
            decision = restart_decision(times, policy, now)
            if decision.allowed:
                memo = observed.failures.get(name)
                failed_uid = [memo.uid] if memo is not None else []
                recent = [t for t in times if now - t < policy.window_seconds] + [now]
                record.update(
                    phase=RESTARTING,
                    members="",
                    restarts=int(record.get("restarts", 0)) + 1,
                    restartTimes=[timestamp(t) for t in recent],
                    lastRestartTime=timestamp(now),
                    lastFailure=reason,
                    retired=sorted({*retired, *(p.uid for p in view.pods), *failed_uid}),
                    readyNodes=0,
                    formingSince=timestamp(now),
                )
                record.pop("nextRestartTime", None)
                if view.pods:
                    out.delete_pods[name] = [p.name for p in view.pods]
                out.events.append(
                    Event(
                        "Warning", "GroupRestarting", f"group {name}: restarting all pods together: {reason}"
                    )
                )
            else:
                phase = FAILED if decision.reason == "RestartLimit" else BACKOFF
                assert decision.not_before is not None
                next_time = timestamp(decision.not_before)
                if record.get("phase") != phase or record.get("nextRestartTime") != next_time:
                    out.events.append(
                        Event(
                            "Warning",
                            "GroupRestartLimited" if phase == FAILED else "GroupBackOff",
                            f"group {name}: {reason}; next restart not before {next_time}",
                        )
                    )
                record.update(phase=phase, lastFailure=reason, nextRestartTime=next_time)
            continue
        record.pop("nextRestartTime", None)
        if view.ready:
            record.update(phase=READY, members=members_hash([p.uid for p in view.pods]), retired=[])
            record.pop("formingSince", None)
        elif view.unschedulable:
            record["phase"] = UNSCHEDULABLE
        elif record.get("phase") in (RESTARTING, UPDATING) and len(view.pods) < view.nodes:
            pass  # still waiting for the replacement pods
        else:
            record["phase"] = FORMING if view.pods else PENDING
        if not record.get("retired"):
            record.pop("retired", None)

    # Pods are deleted only when their group's StatefulSet owns them, each with a uid precondition.
    for group, names in list(out.delete_pods.items()):
        by_name = {p.name: p for p in views[group].pods}
        kept = [n for n in names if by_name[n].owner is None or by_name[n].owner == group]
        out.delete_pods[group] = kept
        out.pod_uids.update({n: by_name[n].uid for n in kept})

    # 2d. Pods stuck Terminating on a node that is gone or NotReady: nothing but a force delete ends them.
    stuck: list[str] = []
    node_down: dict[str, str] = {}
    for record in groups:
        for pod in observed.pods.get(record["name"], ()):
            if pod.node and not node_ok(pod.node):
                node_down.setdefault(record["name"], f"node {pod.node} of pod {pod.name} is NotReady")
            overdue = pod.deletion_deadline is not None and now - pod.deletion_deadline >= force_delete_after
            if pod.deleting and overdue and not node_ok(pod.node) and pod.owner in (None, record["name"]):
                out.force_delete.append((pod.name, pod.uid))
                stuck.append(f"{pod.name} (node {pod.node or '?'})")
    if stuck:
        message = (
            f"force-deleted pod(s) stuck Terminating on an unreachable node for over "
            f"{force_delete_after:g}s, so their StatefulSets recreate them: {', '.join(stuck)}"
        )
        out.events.append(Event("Warning", "ForceDeletedPods", message))

    # 2c. Readiness gates: a pod counts as Ready only while its whole group is Ready.
    for record in groups:
        if record["name"] in out.delete_pods:
            continue  # its pods are going away
        wanted = record.get("phase") == READY
        for pod in views[record["name"]].pods:
            if pod.group_ready_gate != wanted or (wanted and not pod.gate_by_operator):
                out.pod_gates.append((pod.name, wanted))
                if not wanted and not pod.gate_by_operator:
                    out.foreign_gates.add(pod.name)

    # One Event per decision of this pass (not per child): children, re-forms, restarts, drift. A new
    # MoEDeployment's first pass (no status yet) creates every child, which is what creating it means: that
    # Event would say nothing its status (Progressing=True, groups Pending) does not, so none is posted;
    # children created later (scale up, a child deleted by hand) are news and get their Created Event.
    if not previous_status:
        decisions.pop("Created", None)
    reforms = decisions.pop("ReformingGroup", [])
    decided = [Event("Normal", r, f"{r} {len(w)} object(s): {', '.join(w)}") for r, w in decisions.items()]
    if reforms:
        message = f"spec changed; re-forming group(s) {', '.join(reforms)} (all pods of a group together)"
        decided.append(Event("Normal", "ReformingGroup", message))
    out.events = decided + out.events
    if drift:
        message = f"changed outside the operator, re-applied: {'; '.join(drift)}"
        out.events.append(Event("Warning", "DriftCorrected", message))

    gateway = observed.children.get(("Deployment", L.gateway_name(spec.name)))
    out.status = build_status(
        spec,
        groups,
        unschedulable={n: v.unschedulable for n, v in views.items() if v.unschedulable},
        outdated=outdated,
        reforming=reforming,
        gateway_ready_replicas=gateway.ready_replicas if gateway is not None else None,
        previous_status=previous_status,
        now=now,
        current=current,
        problems=[
            *(("FailedCreate", f"group {g}: {m}") for g, m in sorted(observed.create_failures.items())),
            *(("NodeNotReady", f"group {g}: {m}") for g, m in sorted(node_down.items())),
        ],
    )
    return out


def _in_startup_grace(
    view: GroupView, record: Mapping[str, Any], policy: RestartPolicySpec, now: float
) -> bool:
    """The group is (re)forming within restartPolicy.startupGrace and one of its pods has not started yet."""
    since = record.get("formingSince")
    if (
        not since
        or policy.startup_grace_seconds <= 0
        or now - parse_timestamp(since) >= policy.startup_grace_seconds
    ):
        return False
    return len(view.pods) < view.nodes or any(p.starting for p in view.pods)
