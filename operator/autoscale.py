"""Role autoscaling in whole groups: the decision, as pure functions (no I/O). autoscale_loop.py acts on it.

Per role with `spec.roles.<role>.autoscaling`, from a per-group signal read from Prometheus:
- recommendation = ceil(groups * signal / target), like the HorizontalPodAutoscaler; no change while
  |signal/target - 1| <= tolerance; clamped to [minReplicas, maxReplicas];
- stabilization like the HPA's: scale up to the LOWEST recommendation of the last scaleUpStabilization
  (a spike must last), scale down to the HIGHEST of the last scaleDownStabilization (a dip must last);
  on the role's first reading (no history), the current group count counts as a recommendation made
  now, so the first scale down also waits out its whole window (the HPA seeds its history the same way);
- scale up may add several groups at once; scale down removes ONE group at a time and only after it is
  drained (the gateway stops routing to it, its in-flight requests finish): while a drain is in progress
  nothing else changes;
- no signal (no series) -> no change, except restoring [minReplicas, maxReplicas];
- no scale up while a group of the role is not Ready yet (a group added last time, or one pending for lack
  of GPUs: more groups would not serve sooner; the cluster autoscaler adds the nodes);
- additive signals (queue, tokensPerSecond) are the role's total divided by ALL its groups, Ready or not
  (the HPA counts a not-yet-ready pod as idle when scaling up): a group just added lowers the per-group value
  at once, so the next cycle does not add another for the same load.
Prefill and decode are decided independently (one call per role).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from moefleet.operator.spec import AutoscalingSpec

Recommendation = tuple[float, int]  # (unix time, groups)

# PromQL per metric for one role; {sel} is the role's label selector. Each yields ONE number for the role:
# the role's total for additive signals (per_group_signal divides it by the role's groups), as-is otherwise.
SIGNAL_QUERIES = {
    "queue": "sum(moefleet_num_requests_waiting{{{sel}}})",
    "kvUsage": "avg(max by (group) (moefleet_kv_cache_usage_ratio{{{sel}}}))",
    "ttftP90": "histogram_quantile(0.9, sum by (le) (rate(moefleet_time_to_first_token_seconds_bucket{{{sel}}}[2m])))",
    "tokensPerSecond": "sum(rate(moefleet_generation_tokens_total{{{sel}}}[2m]))",
}
ADDITIVE = ("queue", "tokensPerSecond")


def signal_query(metric: str, namespace: str, deployment: str, role: str) -> str:
    sel = f'namespace="{namespace}",deployment="{deployment}",role="{role}"'
    return SIGNAL_QUERIES[metric].format(sel=sel)


def per_group_signal(metric: str, value: float | None, groups: int) -> float | None:
    """The query's answer as the per-group value `target` is compared with."""
    if value is None or metric not in ADDITIVE:
        return value
    return value / max(groups, 1)


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    desired: int  # groups the role should have now
    drain: bool  # True: drain the highest-index group first (desired = current - 1 once drained)
    reason: str
    history: tuple[Recommendation, ...]  # recommendations to remember for the next call


def recommend(current: int, signal: float, spec: AutoscalingSpec) -> int:
    """The HPA formula in groups, clamped to [min, max]."""
    if current == 0:
        raw = 1 if signal > 0 else 0
    elif abs(signal / spec.target - 1.0) <= spec.tolerance:
        raw = current
    else:
        raw = math.ceil(current * signal / spec.target - 1e-9)
    return min(max(raw, spec.min_replicas), spec.max_replicas)


def decide(
    spec: AutoscalingSpec,
    current: int,
    signal: float | None,
    history: Sequence[Recommendation],
    now: float,
    draining: bool = False,
    ready: int | None = None,
) -> ScaleDecision:
    """What the role should do now; `history` is what the previous call returned (kept in status);
    `ready`: the role's Ready groups (None = unknown, no hold)."""
    keep = max(spec.scale_up_stabilization_seconds, spec.scale_down_stabilization_seconds)
    recent = tuple((t, r) for t, r in history if now - t <= keep)
    bounded = min(max(current, spec.min_replicas), spec.max_replicas)
    if draining:
        return ScaleDecision(
            current, False, "a group is draining; waiting for it before any other change", recent
        )
    if bounded != current:
        why = (
            f"below minReplicas {spec.min_replicas}"
            if bounded > current
            else f"above maxReplicas {spec.max_replicas}"
        )
        if bounded > current:
            return ScaleDecision(bounded, False, f"{current} group(s) is {why}", recent)
        return ScaleDecision(current, True, f"{current} group(s) is {why}: draining one", recent)
    if signal is None:
        return ScaleDecision(current, False, f"no {spec.metric} signal: holding {current} group(s)", recent)
    raw = recommend(current, signal, spec)
    if not history and raw < current and spec.scale_down_stabilization_seconds > 0:
        # The first reading of the role (no history at all): like the HPA, count the current groups as
        # recommended now, so a first low reading (a group's series not scraped yet, a failed scrape) cannot
        # drain a group before the down window has passed with every reading low.
        recent = ((now, current),)
    recent = (*recent, (now, raw))
    ups = [r for t, r in recent if now - t <= spec.scale_up_stabilization_seconds] or [raw]
    downs = [r for t, r in recent if now - t <= spec.scale_down_stabilization_seconds] or [raw]
    what = f"{spec.metric} {signal:g} per group vs target {spec.target:g}"
    up_to = min(ups)
    if up_to > current and ready is not None and ready < current:
        return ScaleDecision(
            current,
            False,
            f"{what}: would scale up to {up_to}, waiting for {current - ready} group(s) to become Ready "
            "(see the Degraded condition)",
            recent,
        )
    if up_to > current:
        return ScaleDecision(up_to, False, f"{what}: scale up {current} -> {up_to} group(s)", recent)
    down_to = max(downs)
    if down_to < current:
        return ScaleDecision(
            current,
            True,
            f"{what}: scale down {current} -> {current - 1} group(s) after draining one",
            recent,
        )
    if raw != current:
        return ScaleDecision(
            current, False, f"{what}: recommendation {raw} not stable yet, holding {current}", recent
        )
    return ScaleDecision(current, False, f"{what}: within tolerance, holding {current}", recent)
