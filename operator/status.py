"""The MoEDeployment status: conditions, per-role counts, groups, last restart (pure, no clock).

Everything here is a function of its arguments, so an unchanged cluster yields an identical status and the
operator skips the write. Condition lastTransitionTime only moves when the condition's status changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from moefleet.operator import labels as L
from moefleet.operator.spec import MoEDeploymentSpec

Obj = dict[str, Any]

# Group phases recorded in status.groups[].phase.
PENDING = "Pending"  # no pod yet
FORMING = "Forming"  # pods starting, not all Ready
READY = "Ready"  # every pod Ready
RESTARTING = "Restarting"  # pods deleted by the operator after a failure; waiting for the new ones
UPDATING = "Updating"  # pods deleted by the operator to re-form the group with a new StatefulSet
BACKOFF = "BackOff"  # failed; waiting for the backoff delay before restarting
FAILED = "Failed"  # failed and out of restarts for this window
UNSCHEDULABLE = "Unschedulable"  # some pod cannot be placed

CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


def timestamp(epoch: float) -> str:
    """RFC 3339, whole seconds, UTC (what Kubernetes uses for condition times)."""
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def condition(
    type_: str,
    status: bool,
    reason: str,
    message: str,
    previous_status: Mapping[str, Any],
    generation: int,
    now: float,
) -> Obj:
    status_text = "True" if status else "False"
    old: Mapping[str, Any] = next(
        (c for c in previous_status.get("conditions") or [] if c.get("type") == type_), {}
    )
    since = old.get("lastTransitionTime") if old.get("status") == status_text else None
    return {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message[:1024],
        "observedGeneration": generation,
        "lastTransitionTime": since or timestamp(now),
    }


def _degraded(groups: Sequence[Mapping[str, Any]], unschedulable: Mapping[str, str]) -> tuple[str, str]:
    """(reason, message) of the most actionable problem, or ("AsExpected", ...)."""
    if unschedulable:
        name = sorted(unschedulable)[0]
        insufficient = any(f"Insufficient {L.GPU_RESOURCE}" in m for m in unschedulable.values())
        return (
            "InsufficientGPUs" if insufficient else "Unschedulable",
            f"group {name}: {unschedulable[name]}",
        )
    failed = [g for g in groups if g.get("phase") == FAILED]
    if failed:
        return (
            "RestartLimit",
            f"group {failed[0]['name']} is out of restarts: {failed[0].get('lastFailure', '')}",
        )
    restarting = [g for g in groups if g.get("phase") in (RESTARTING, BACKOFF)]
    if restarting:
        return "GroupRestarting", f"group {restarting[0]['name']}: {restarting[0].get('lastFailure', '')}"
    return "AsExpected", "no group is failing"


def build_status(
    spec: MoEDeploymentSpec,
    groups: Sequence[Obj],
    unschedulable: Mapping[str, str],
    outdated: Sequence[str],
    reforming: set[str],
    gateway_ready_replicas: int | None,
    previous_status: Mapping[str, Any],
    now: float,
) -> Obj:
    """The full status object written to the status subresource."""
    roles: Obj = {}
    groups_ready: Obj = {}
    for role in spec.roles:
        mine = [g for g in groups if g["role"] == role.name]
        ready_count = sum(g.get("phase") == READY for g in mine)
        roles[role.name] = {
            "replicas": role.replicas,
            "readyGroups": ready_count,
            "nodesPerGroup": role.nodes_per_replica,
            "readyNodes": sum(int(g.get("readyNodes", 0)) for g in mine),
        }
        groups_ready[role.name] = f"{ready_count}/{role.replicas}"

    gateway_ready = gateway_ready_replicas is not None and gateway_ready_replicas >= spec.gateway.replicas
    all_groups_ready = bool(groups) and all(g.get("phase") == READY for g in groups)
    degraded_reason, degraded_message = _degraded(groups, unschedulable)

    not_ready = [g["name"] for g in groups if g.get("phase") != READY]
    if outdated:
        doing = ", ".join(sorted(reforming)) or "none (waiting for every other group to be Ready)"
        progressing = (
            True,
            "Reforming",
            f"{len(outdated)} changed group(s) to re-form one at a time; now: {doing}",
        )
    elif not_ready:
        progressing = (
            True,
            "GroupsStarting",
            f"{len(not_ready)} group(s) not Ready: {', '.join(not_ready[:5])}",
        )
    elif not gateway_ready:
        progressing = (True, "GatewayStarting", "the gateway Deployment is not available yet")
    else:
        progressing = (False, "Complete", "every group and the gateway are Ready")

    if all_groups_ready and gateway_ready:
        ready = (True, "AllGroupsReady", f"{len(groups)} group(s) and the gateway are Ready")
    elif not groups:
        ready = (False, "NoGroups", "every role has replicas: 0")
    else:
        ready = (False, "GroupsNotReady" if not all_groups_ready else "GatewayNotReady", progressing[2])

    generation = spec.generation
    status: Obj = {
        "observedGeneration": generation,
        "conditions": [
            condition("Ready", *ready, previous_status, generation, now),
            condition("Progressing", *progressing, previous_status, generation, now),
            condition(
                "Degraded",
                degraded_reason != "AsExpected",
                degraded_reason,
                degraded_message,
                previous_status,
                generation,
                now,
            ),
        ],
        "roles": roles,
        "groupsReady": groups_ready,
        "groups": list(groups),
        "gateway": {"replicas": spec.gateway.replicas, "readyReplicas": gateway_ready_replicas or 0},
    }
    restarted = [g for g in groups if g.get("lastRestartTime")]
    last = max(restarted, key=lambda g: g["lastRestartTime"], default=None)
    if last is not None:
        status["lastRestart"] = {
            "group": last["name"],
            "time": last["lastRestartTime"],
            "reason": last.get("lastFailure", ""),
        }
    elif previous_status.get("lastRestart"):
        status["lastRestart"] = previous_status["lastRestart"]
    # balancedness / lastRebalanceTime belong to the EPLB trigger (later work) and are carried over.
    status["eplb"] = {**(previous_status.get("eplb") or {}), "enabled": spec.eplb.enabled}
    return status


def invalid_spec_status(
    previous_status: Mapping[str, Any], field: str, message: str, generation: int, now: float
) -> Obj:
    """Status for a spec the operator refuses to act on (children are left as they are)."""
    status = {k: v for k, v in previous_status.items() if k not in ("conditions", "observedGeneration")}
    reason_message = f"{field}: {message}"
    status["observedGeneration"] = generation
    status["conditions"] = [
        condition("Ready", False, "InvalidSpec", reason_message, previous_status, generation, now),
        condition("Progressing", False, "InvalidSpec", reason_message, previous_status, generation, now),
        condition("Degraded", True, "InvalidSpec", reason_message, previous_status, generation, now),
    ]
    return status


def condition_events(previous_status: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    """One event per condition whose status changed (Degraded=True is a Warning)."""
    before = {c["type"]: c.get("status") for c in previous_status.get("conditions") or []}
    events = []
    for cond in status.get("conditions") or []:
        if before.get(cond["type"]) != cond["status"]:
            warning = cond["type"] == "Degraded" and cond["status"] == "True"
            events.append(
                Event(
                    "Warning" if warning else "Normal",
                    f"{cond['type']}{cond['status']}",
                    f"{cond['reason']}: {cond['message']}",
                )
            )
    return events
