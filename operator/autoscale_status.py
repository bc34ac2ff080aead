"""Role autoscaling's status bookkeeping, as pure functions: status.autoscaling.<role> entries, the
AutoscalingReady condition, and reading a role's groups and replicas back from the object (no I/O).
autoscale_loop.py writes what these return."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from moefleet.operator import autoscale as A
from moefleet.operator.spec import MoEDeploymentSpec, RoleSpec
from moefleet.operator.status import timestamp

CONDITION = "AutoscalingReady"
HISTORY_LIMIT = 256  # recommendations kept in status per role (the windows need far fewer)

Mutate = Callable[[dict[str, Any]], dict[str, Any]]


def role_of(spec: MoEDeploymentSpec, group: str) -> tuple[str, int] | None:
    for role in spec.roles:
        prefix = f"{spec.name}-{role.name}-"
        if group.startswith(prefix) and group[len(prefix) :].isdigit():
            return role.name, int(group[len(prefix) :])
    return None


def set_entry(role: str, **fields: Any) -> Mutate:
    """Update status.autoscaling.<role> (a None value removes the key)."""

    def mutate(current: dict[str, Any]) -> dict[str, Any]:
        autoscaling = dict(current.get("autoscaling") or {})
        entry = dict(autoscaling.get(role) or {})
        for key, value in fields.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        autoscaling[role] = entry
        return {**current, "autoscaling": autoscaling}

    return mutate


def draining_entry(role: str, replicas: int, group: str, since: float, reason: str, **common: Any) -> Mutate:
    """status.autoscaling.<role> while `group` (the highest of `replicas`) drains since `since`."""
    return set_entry(
        role,
        current=replicas,
        desired=replicas - 1,
        draining=group,
        drainStartTime=timestamp(since),
        reason=reason,
        **common,
    )


def set_condition(new: dict[str, Any]) -> Mutate:
    def mutate(current: dict[str, Any]) -> dict[str, Any]:
        others = [c for c in current.get("conditions") or [] if c.get("type") != new["type"]]
        return {**current, "conditions": [*others, new]}

    return mutate


def raw_replicas(body: Mapping[str, Any], role: str) -> int:
    return int(((body.get("spec") or {}).get("roles") or {}).get(role, {}).get("replicas", 1))


def history_of(entry: Mapping[str, Any]) -> list[A.Recommendation]:
    out = []
    for item in entry.get("history") or []:
        if isinstance(item, list) and len(item) == 2:
            out.append((float(item[0]), int(item[1])))
    return out


def drop(roles: tuple[str, ...], condition_too: bool) -> Mutate:
    def mutate(current: dict[str, Any]) -> dict[str, Any]:
        out = {**current}
        if condition_too:
            out["conditions"] = [c for c in current.get("conditions") or [] if c.get("type") != CONDITION]
        autoscaling = {k: v for k, v in (current.get("autoscaling") or {}).items() if k not in roles}
        if autoscaling:
            out["autoscaling"] = autoscaling
        else:
            out.pop("autoscaling", None)
        return out

    return mutate


def readiness(
    error: str | None, absent: list[str], autoscaled: Mapping[str, RoleSpec]
) -> tuple[bool, str, str]:
    """AutoscalingReady's (status, reason, message) for one cycle: Prometheus unreadable, a signal absent, or fine."""
    if error is not None:
        ready = (False, "PrometheusUnavailable", f"no scaling while Prometheus cannot be read: {error}")
    elif absent:
        metrics = ", ".join(f"{r} ({autoscaled[r].autoscaling.metric})" for r in absent)  # type: ignore[union-attr]
        ready = (
            False,
            "SignalAbsent",
            f"no series for role(s) {metrics}: holding their groups; check that Prometheus scrapes the "
            "engines (spec.monitoring.podMonitor) and that they serve traffic",
        )
    else:
        ready = (True, "Monitoring", f"{len(autoscaled)} role(s) scaled from Prometheus")
    return ready
