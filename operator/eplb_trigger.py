"""The EPLB trigger's decisions, as pure functions (no I/O): which group to rebalance, and what to report.

The EPLB task (eplb_loop.py) reads each group's `moefleet_eplb_balancedness` from Prometheus over
`spec.eplb.window` as a range query, hands the samples here, and executes what comes back. A group is
rebalanced when ALL of these hold:
- its samples cover the whole window (first sample within one step of the window's start, no gap longer than
  two steps, the last one within two steps of now): never rebalance on partial data;
- every sample is below `spec.eplb.threshold`;
- the whole window lies after its last rebalance request and `spec.eplb.cooldown` has passed since it
  (the request time is written to the status BEFORE the POST, so an operator restarted mid-decision sees
  the cooldown and does not ask twice);
- it is the lowest-balancedness candidate of its role (one group at a time per role).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moefleet.operator.spec import EPLB_MODES, MoEDeploymentSpec

METRIC = "moefleet_eplb_balancedness"
MODES = EPLB_MODES
IN_PROGRESS = "InProgress"
# Balancedness in the status is rounded to 0.01: the status is rewritten only when a reading moves that much,
# not on every scrape-level wiggle (the dashboards have the exact series).
STATUS_DIGITS = 2

Sample = tuple[float, float]  # (unix time, balancedness)


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """What status.eplb remembers about one group between cycles (and operator restarts)."""

    last_rebalance_time: float | None = None
    rebalances: int = 0
    last_result: str = ""


@dataclass(frozen=True, slots=True)
class GroupView:
    role: str
    group: str
    balancedness: float | None  # latest sample, None when the series is absent
    eligible: bool
    reason: str  # why it is (not) eligible, for status and logs


@dataclass(frozen=True, slots=True)
class Decision:
    groups: tuple[GroupView, ...]
    rebalance: tuple[GroupView, ...] = ()  # at most one per role
    absent: tuple[str, ...] = field(default=())  # groups with no series in Prometheus


def query_step(window_seconds: float) -> float:
    """Range-query resolution: about 60 points per window, never finer than 1 s."""
    return max(1.0, window_seconds / 60.0)


def selector(namespace: str, deployment: str) -> str:
    """PromQL series selector of one deployment's engine pods (labels set by the PodMonitor's relabelings)."""
    return f'{METRIC}{{namespace="{namespace}",deployment="{deployment}"}}'


def range_query(namespace: str, deployment: str) -> str:
    # Every rank of a group exports the same group-wide reading; max is the conservative aggregate.
    return f"max by (role, group) ({selector(namespace, deployment)})"


def parse_matrix(payload: Mapping[str, Any]) -> dict[str, tuple[str, list[Sample]]]:
    """A Prometheus /api/v1/query_range answer -> {group: (role, [(t, value), ...])}; raises ValueError."""
    if payload.get("status") != "success":
        raise ValueError(f"Prometheus answered {payload.get('status')!r}: {payload.get('error', '')}")
    data = payload.get("data") or {}
    if data.get("resultType") != "matrix":
        raise ValueError(f"expected a matrix, got {data.get('resultType')!r}")
    out: dict[str, tuple[str, list[Sample]]] = {}
    for series in data.get("result") or []:
        labels = series.get("metric") or {}
        group = labels.get("group")
        if not group:
            continue
        samples = [(float(t), float(v)) for t, v in series.get("values") or []]
        out[group] = (labels.get("role", ""), sorted(samples))
    return out


def covers_window(samples: Sequence[Sample], now: float, window: float, step: float) -> str:
    """'' when the samples cover [now - window, now] without holes, else why not."""
    if not samples:
        return "no samples"
    start = now - window
    if samples[0][0] > start + step:
        return f"data for {now - samples[0][0]:.0f}s of the {window:.0f}s window"
    if now - samples[-1][0] > 2 * step:
        return f"no sample for {now - samples[-1][0]:.0f}s"
    for (t0, _), (t1, _) in zip(samples, samples[1:], strict=False):
        if t1 - t0 > 2 * step:
            return f"a {t1 - t0:.0f}s gap in the window"
    return ""


def decide(
    spec: MoEDeploymentSpec,
    series: Mapping[str, tuple[str, Sequence[Sample]]],
    records: Mapping[str, GroupRecord],
    now: float,
) -> Decision:
    """Which groups to rebalance now (at most one per role) and why each other group is left alone."""
    eplb = spec.eplb
    step = query_step(eplb.window_seconds)
    views: list[GroupView] = []
    absent: list[str] = []
    for role in spec.roles:
        for replica in range(role.replicas):
            group = f"{spec.name}-{role.name}-{replica}"
            _, samples = series.get(group, (role.name, []))
            record = records.get(group, GroupRecord())
            latest = samples[-1][1] if samples else None
            if not samples:
                absent.append(group)
            reason = _why_not(
                eplb.threshold, eplb.window_seconds, eplb.cooldown_seconds, samples, record, now, step
            )
            views.append(
                GroupView(role.name, group, latest, not reason, reason or "below threshold for the window")
            )
    chosen: list[GroupView] = []
    if _mode(spec) == "operator":
        for role in spec.roles:
            candidates = [v for v in views if v.role == role.name and v.eligible]
            if candidates:
                chosen.append(min(candidates, key=lambda v: (v.balancedness or 0.0, v.group)))
    return Decision(groups=tuple(views), rebalance=tuple(chosen), absent=tuple(absent))


def _why_not(
    threshold: float,
    window: float,
    cooldown: float,
    samples: Sequence[Sample],
    record: GroupRecord,
    now: float,
    step: float,
) -> str:
    gap = covers_window(samples, now, window, step)
    if gap:
        return gap
    worst = max(v for _, v in samples)
    if worst >= threshold:
        return f"balancedness reached {worst:.3f} >= threshold {threshold:g} in the window"
    last = record.last_rebalance_time
    if last is not None:
        if now - last < cooldown:
            return f"cooldown: last rebalance {now - last:.0f}s ago (< {cooldown:.0f}s)"
        if now - window < last:
            return "the window starts before the last rebalance"
    return ""


def _mode(spec: MoEDeploymentSpec) -> str:
    return "off" if not spec.eplb.enabled else spec.eplb.mode


def record_from_status(entry: Mapping[str, Any], parse_time: Any) -> GroupRecord:
    """status.eplb.roles.<role>.groups.<group> -> GroupRecord (`parse_time` turns RFC 3339 into epoch)."""
    when = entry.get("lastRebalanceTime")
    return GroupRecord(
        last_rebalance_time=parse_time(when) if when else None,
        rebalances=int(entry.get("rebalances") or 0),
        last_result=str(entry.get("lastResult") or ""),
    )


def records_from_status(eplb_status: Mapping[str, Any], parse_time: Any) -> dict[str, GroupRecord]:
    out: dict[str, GroupRecord] = {}
    for role in (eplb_status.get("roles") or {}).values():
        for group, entry in (role.get("groups") or {}).items():
            out[group] = record_from_status(entry, parse_time)
    return out


def eplb_status(
    spec: MoEDeploymentSpec,
    decision: Decision,
    records: Mapping[str, GroupRecord],
    format_time: Any,
) -> dict[str, Any]:
    """status.eplb: per role/group balancedness, lastRebalanceTime, rebalances, lastResult, and the lowest
    group's balancedness at the top (the Balancedness printer column)."""
    roles: dict[str, Any] = {}
    for view in decision.groups:
        record = records.get(view.group, GroupRecord())
        entry: dict[str, Any] = {"rebalances": record.rebalances}
        if view.balancedness is not None:
            entry["balancedness"] = round(view.balancedness, STATUS_DIGITS)
        if record.last_rebalance_time is not None:
            entry["lastRebalanceTime"] = format_time(record.last_rebalance_time)
        if record.last_result:
            entry["lastResult"] = record.last_result
        roles.setdefault(view.role, {"groups": {}})["groups"][view.group] = entry
    values = [v.balancedness for v in decision.groups if v.balancedness is not None]
    out: dict[str, Any] = {
        "enabled": spec.eplb.enabled,
        "mode": _mode(spec),
        "threshold": spec.eplb.threshold,
        "roles": roles,
    }
    if values:
        out["balancedness"] = round(min(values), STATUS_DIGITS)
    return out


def readiness(decision: Decision, prometheus_error: str | None) -> tuple[bool, str, str]:
    """The EPLBReady condition: (status, reason, message)."""
    if prometheus_error is not None:
        return (
            False,
            "PrometheusUnavailable",
            f"no rebalance while Prometheus cannot be read: {prometheus_error}",
        )
    if decision.absent:
        names = ", ".join(decision.absent[:5]) + (" ..." if len(decision.absent) > 5 else "")
        return (
            False,
            "SeriesAbsent",
            f"no {METRIC} series for {names}: check that EPLB is active in the engines and Prometheus scrapes "
            "them (spec.monitoring.podMonitor)",
        )
    return True, "Monitoring", f"{len(decision.groups)} group(s) watched"
