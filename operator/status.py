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

CONDITION_TYPES = ("Available", "Ready", "Progressing", "Degraded")


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


def _degraded(
    groups: Sequence[Mapping[str, Any]],
    unschedulable: Mapping[str, str],
    problems: Sequence[tuple[str, str]] = (),
) -> tuple[str, str]:
    """(reason, message) of the most actionable problem, or ("AsExpected", ...). `problems`: (reason,
    message) pairs found elsewhere, most actionable first (FailedCreate with the API server's message,
    NodeNotReady); a FailedCreate outranks everything, a NodeNotReady comes after scheduling problems."""
    first = [p for p in problems if p[0] == "FailedCreate"]
    if first:
        return first[0]
    later = [p for p in problems if p[0] != "FailedCreate"]
    if later and not unschedulable:
        return later[0]
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


def min_ready_groups(replicas: int) -> int:
    """A role's minimum serving capacity: all its groups but one (the role PDB's budget), at least one."""
    return max(1, replicas - 1) if replicas > 0 else 0


def _available(
    spec: MoEDeploymentSpec, ready_by_role: Mapping[str, int], gateway_ready: int, starting: bool
) -> tuple[bool, str, str]:
    """`starting`: the deployment has never been Available yet (reason Starting instead of a failure)."""
    available, reason, message = _available_now(spec, ready_by_role, gateway_ready)
    if not available and starting and reason != "NoGroups":
        return False, "Starting", f"not serving yet: {message}"
    return available, reason, message


def _available_now(
    spec: MoEDeploymentSpec, ready_by_role: Mapping[str, int], gateway_ready: int
) -> tuple[bool, str, str]:
    short = [
        f"role {role.name}: {ready_by_role.get(role.name, 0)}/{role.replicas} group(s) Ready "
        f"(needs {min_ready_groups(role.replicas)})"
        for role in spec.roles
        if role.replicas > 0 and ready_by_role.get(role.name, 0) < min_ready_groups(role.replicas)
    ]
    if not any(role.replicas > 0 for role in spec.roles):
        return False, "NoGroups", "every role has replicas: 0"
    if short:
        return False, "MinimumGroupsUnavailable", "; ".join(short)
    if gateway_ready < 1:
        return False, "GatewayUnavailable", "no gateway replica is Ready"
    summary = ", ".join(f"{r.name} {ready_by_role.get(r.name, 0)}/{r.replicas}" for r in spec.roles)
    return True, "MinimumGroupsAvailable", f"groups Ready per role: {summary}; gateway Ready"


def _progressing(
    groups: Sequence[Mapping[str, Any]],
    current: Mapping[str, bool],
    outdated: Sequence[str],
    reforming: set[str],
    gateway_ready: bool,
) -> tuple[bool, str, str]:
    not_ready = [g for g in groups if g.get("phase") != READY]
    stuck = [g for g in not_ready if g.get("phase") in (UNSCHEDULABLE, FAILED)]
    if stuck and len(stuck) == len(not_ready) and not reforming:
        first = stuck[0]
        why = "cannot be scheduled" if first.get("phase") == UNSCHEDULABLE else "is out of restarts"
        return (
            False,
            "Stalled",
            f"{len(stuck)} group(s) cannot progress without a change; group {first['name']} {why} "
            "(see the Degraded condition)",
        )
    if outdated:
        doing = ", ".join(sorted(reforming)) or "none (waiting for every other group to be Ready)"
        return True, "Reforming", f"{len(outdated)} changed group(s) to re-form one at a time; now: {doing}"
    if not_ready:
        names = ", ".join(g["name"] for g in not_ready[:5])
        return True, "GroupsStarting", f"{len(not_ready)} group(s) not Ready: {names}"
    old = [g["name"] for g in groups if not current.get(g["name"], False)]
    if old:
        return True, "RolloutPending", f"pods of {len(old)} group(s) not yet at their StatefulSet's revision"
    if not gateway_ready:
        return True, "GatewayStarting", "the gateway Deployment is not available yet"
    return False, "Complete", "every group runs the current spec and is Ready; the gateway is Ready"


def build_status(
    spec: MoEDeploymentSpec,
    groups: Sequence[Obj],
    unschedulable: Mapping[str, str],
    outdated: Sequence[str],
    reforming: set[str],
    gateway_ready_replicas: int | None,
    previous_status: Mapping[str, Any],
    now: float,
    current: Mapping[str, bool] | None = None,
    problems: Sequence[tuple[str, str]] = (),
) -> Obj:
    """The full status object written to the status subresource.

    `current[group]`: every pod of the group was created from its StatefulSet's update revision and that
    StatefulSet is the rendered one (measured by the planner); None = every group not outdated is current.
    Conditions (docs/operator.md "Conditions"):
    - Available: every role with replicas has at least `min_ready_groups` Ready groups (any spec version)
      and the gateway has a Ready replica: the deployment can serve. One restarting group of ten keeps it.
    - Ready: every desired group is Ready at the current spec, and the whole gateway is Ready.
    - Progressing: True while groups are created, restarted, re-formed or rolled; False with reason
      Complete when done, Stalled when the remaining groups cannot move without a change.
    - Degraded: True with the most actionable problem (InsufficientGPUs, Unschedulable, RestartLimit,
      GroupRestarting), else False / AsExpected.
    """
    if current is None:
        current = {g["name"]: g["name"] not in outdated for g in groups}
    roles: Obj = {}
    groups_ready: Obj = {}
    ready_by_role: dict[str, int] = {}
    for role in spec.roles:
        mine = [g for g in groups if g["role"] == role.name]
        ready_count = sum(g.get("phase") == READY for g in mine)
        ready_by_role[role.name] = ready_count
        roles[role.name] = {
            "replicas": role.replicas,
            "readyGroups": ready_count,
            "updatedGroups": sum(bool(current.get(g["name"])) for g in mine),
            "minReadyGroups": min_ready_groups(role.replicas),
            "nodesPerGroup": role.nodes_per_replica,
            "readyNodes": sum(int(g.get("readyNodes", 0)) for g in mine),
        }
        groups_ready[role.name] = f"{ready_count}/{role.replicas}"

    gateway_ready_count = gateway_ready_replicas or 0
    gateway_ready = gateway_ready_replicas is not None and gateway_ready_replicas >= spec.gateway.replicas
    all_groups_ready = bool(groups) and all(
        g.get("phase") == READY and current.get(g["name"], False) for g in groups
    )
    degraded_reason, degraded_message = _degraded(groups, unschedulable, problems)
    progressing = _progressing(groups, current, outdated, reforming, gateway_ready)
    before = next((c for c in previous_status.get("conditions") or [] if c.get("type") == "Available"), None)
    starting = before is None or before.get("reason") == "Starting"
    available = _available(spec, ready_by_role, gateway_ready_count, starting)

    if all_groups_ready and gateway_ready:
        ready = (
            True,
            "AllGroupsReady",
            f"{len(groups)} group(s) at the current spec and the gateway are Ready",
        )
    elif not groups:
        ready = (False, "NoGroups", "every role has replicas: 0")
    else:
        ready = (False, "GroupsNotReady" if not all_groups_ready else "GatewayNotReady", progressing[2])

    generation = spec.generation
    status: Obj = {
        "observedGeneration": generation,
        "conditions": [
            condition("Available", *available, previous_status, generation, now),
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
        "gateway": {"replicas": spec.gateway.replicas, "readyReplicas": gateway_ready_count},
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
    # Conditions other loops own (EPLBReady: eplb_loop.py) are carried over as they are.
    status["conditions"] += _foreign_conditions(previous_status)
    # status.eplb (balancedness, per-group records) belongs to the EPLB trigger and is carried over.
    status["eplb"] = {**(previous_status.get("eplb") or {}), "enabled": spec.eplb.enabled}
    # status.autoscaling (per-role decisions, history, pending intent) belongs to autoscale_loop.py.
    if previous_status.get("autoscaling"):
        status["autoscaling"] = previous_status["autoscaling"]
    return status


CORE_CONDITIONS = ("Available", "Ready", "Progressing", "Degraded")


def _foreign_conditions(previous_status: Mapping[str, Any]) -> list[Obj]:
    return [c for c in previous_status.get("conditions") or [] if c.get("type") not in CORE_CONDITIONS]


def with_degraded(
    status: Mapping[str, Any], previous_status: Mapping[str, Any], reason: str, message: str, now: float
) -> Obj:
    """`status` with Degraded=True (reason, message) in place of its Degraded condition (e.g. ApplyFailed:
    the API server refused a write; the message is the server's)."""
    out = dict(status)
    generation = int(status.get("observedGeneration") or 0)
    new = condition("Degraded", True, reason, message, previous_status, generation, now)
    out["conditions"] = [new if c.get("type") == "Degraded" else c for c in status.get("conditions") or []]
    return out


def invalid_spec_status(
    previous_status: Mapping[str, Any], field: str, message: str, generation: int, now: float
) -> Obj:
    """Status for a spec the operator refuses to act on (children are left as they are)."""
    status = {k: v for k, v in previous_status.items() if k not in ("conditions", "observedGeneration")}
    reason_message = f"{field}: {message}"
    status["observedGeneration"] = generation
    # The children are left as they are, so whether they can serve is unknown here: keep Available as it was.
    available = [c for c in previous_status.get("conditions") or [] if c.get("type") == "Available"]
    status["conditions"] = [
        *available,
        condition("Ready", False, "InvalidSpec", reason_message, previous_status, generation, now),
        condition("Progressing", False, "InvalidSpec", reason_message, previous_status, generation, now),
        condition("Degraded", True, "InvalidSpec", reason_message, previous_status, generation, now),
        *_foreign_conditions(previous_status),
    ]
    return status


def condition_events(previous_status: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    """At most one Event per status write, and only for what a person acts on: the deployment became
    unavailable or degraded (a Warning) or recovered from that. Routine changes (Ready and Progressing moving
    during restarts and rollouts, the first convergence out of Available=False/Starting, the first status
    unless it is Degraded) post none; when an Event is posted its message names every condition change.
    Its reason is `AvailableFalse`, then `DegradedTrue`, else the first trigger (`AvailableTrue`, ...)."""
    old = {c["type"]: c for c in previous_status.get("conditions") or []}
    changed = [
        c for c in status.get("conditions") or [] if (old.get(c["type"]) or {}).get("status") != c["status"]
    ]

    def triggers(c: Mapping[str, Any]) -> bool:
        if c["type"] == "Degraded":
            return c["status"] == "True" or c["type"] in old
        if c["type"] == "Available" and c["type"] in old:
            return old["Available"].get("reason") != "Starting"  # not the first convergence
        return False

    trigger = [c for c in changed if triggers(c)]
    if not trigger:
        return []
    bad = [
        c
        for c in trigger
        if (c["type"] == "Available" and c["status"] == "False")
        or (c["type"] == "Degraded" and c["status"] == "True")
    ]
    message = "; ".join(f"{c['type']}={c['status']} {c['reason']}: {c['message']}" for c in changed)
    first = (bad or trigger)[0]
    return [Event("Warning" if bad else "Normal", f"{first['type']}{first['status']}", message)]


# Group phases that are steps of one start-up (no pod yet / pods starting): moving between them is progress.
_STARTING_PHASES = (PENDING, FORMING)
# Conditions whose reason (not only status) is news: another reason is another problem or another cause.
_REASON_MATTERS = ("Available", "Degraded")


def _significant(status: Mapping[str, Any]) -> Obj:
    """`status` without what only reports progress: ready-node counts, the gateway's ready count, condition
    messages (and the reasons of Ready/Progressing, which name the current step), Pending vs Forming."""
    out = {k: v for k, v in status.items() if k not in ("conditions", "groups", "roles", "gateway")}
    out["conditions"] = [
        (c.get("type"), c.get("status"), c.get("reason") if c.get("type") in _REASON_MATTERS else "")
        for c in status.get("conditions") or []
    ]
    out["groups"] = [
        {
            **{k: v for k, v in g.items() if k != "readyNodes"},
            "phase": "Starting" if g.get("phase") in _STARTING_PHASES else g.get("phase"),
        }
        for g in status.get("groups") or []
    ]
    out["roles"] = {
        role: {k: v for k, v in counts.items() if k != "readyNodes"}
        for role, counts in (status.get("roles") or {}).items()
    }
    out["gateway"] = {k: v for k, v in (status.get("gateway") or {}).items() if k != "readyReplicas"}
    return out


def write_due(
    previous: Mapping[str, Any],
    status: Mapping[str, Any],
    other_writes: bool,
    seconds_since_last_write: float | None,
    batch_seconds: float,
) -> bool:
    """Write `status` now? (pure; the operator's status batching, like kube-controller-manager's
    --endpointslice-updates-batch-period). Yes when it differs from `previous` and any of: the same pass makes
    other writes (children, gates, pod deletes: the status records them), the change is more than progress
    (a condition's status or an Available/Degraded reason, a group becoming Ready/failing/restarting, its
    members, restart records, observedGeneration, ...), no write of this object is known
    (`seconds_since_last_write` None, e.g. after an operator restart), or the last write is at least
    `batch_seconds` old. A progress-only change within the batch period waits for a later pass, which
    writes the status as it is then: several steps of one start-up cost one write."""
    if status == previous:
        return False
    if other_writes or seconds_since_last_write is None or seconds_since_last_write >= batch_seconds:
        return True
    return _significant(status) != _significant(previous)
