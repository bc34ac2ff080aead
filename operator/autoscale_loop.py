"""Role autoscaling's side effects: scale a role in whole groups, drain before removing (the Prometheus
query is autoscale_prometheus.py, the status bookkeeping autoscale_status.py, the decision autoscale.py).

One cycle per MOEFLEET_OPERATOR_AUTOSCALE_INTERVAL_SECONDS, run by a per-MoEDeployment task of the operator
(handlers.py) on a fresh GET of the object. Per role with `spec.roles.<role>.autoscaling`:

  Prometheus instant query (httpx) -> autoscale.decide (pure) -> one of
  - scale up:  status `pending {from, to}` (the intent, written FIRST) -> JSON patch of
               spec.roles.<role>.replicas (`test` from, `add` to) -> status current/lastScaleTime/reason,
               pending removed -> Event ScaledUp;
  - drain:     the draining annotation names the role's highest group (group_drain.py; the gateway stops
               routing to it) -> status draining -> Event DrainStarted; later cycles wait until the group is
               idle (or the drain timeout) -> the same intent/patch/report steps as a scale up, the patch also
               dropping the group from the annotation (one request: replicas and annotation change together)
               -> Event ScaledDown.
The intent makes every step idempotent across operator restarts: a pending intent is finished first (the
patch is skipped when replicas already equal `to`), a drain in the annotation is continued, never chosen
again. The patch's `test` operation makes a concurrent hand edit of replicas win: the intent is dropped.
Prometheus unreachable -> no decision at all and AutoscalingReady=False PrometheusUnavailable (+ an Event).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from moefleet.operator import autoscale as A
from moefleet.operator import group_drain as D
from moefleet.operator import labels as L
from moefleet.operator.autoscale_prometheus import query_signal
from moefleet.operator.autoscale_status import (
    CONDITION,
    HISTORY_LIMIT,
    Mutate,
    draining_entry,
    drop,
    history_of,
    raw_replicas,
    readiness,
    role_of,
    set_condition,
    set_entry,
)
from moefleet.operator.eplb_loop import engine_url
from moefleet.operator.kube import Kube, KubeError, _path
from moefleet.operator.spec import MoEDeploymentSpec, RoleSpec
from moefleet.operator.status import READY, Event, condition, timestamp
from prometheus_client import Counter

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "moefleet_operator_scaling_decisions",
    "Autoscaler actions per role: scaled_up, drain_started, scaled_down, abandoned (replicas changed by "
    "someone else), skipped_no_data (Prometheus unreadable or the signal absent)",
    ["role", "outcome"],
)


@dataclass(frozen=True)
class Context:
    kube: Kube
    write_status: Callable[[Mutate], None]
    prometheus: httpx.Client
    prometheus_url: str
    engine_template: str
    drain_grace_seconds: float
    drain_timeout_seconds: float
    fault_exit_after: str = ""  # test-only: exit the process right after this named step

    def checkpoint(self, step: str) -> None:
        if self.fault_exit_after == step:
            log.warning("MOEFLEET_OPERATOR_FAULT_EXIT_AFTER=%s: exiting now (test fault injection)", step)
            os._exit(137)


def wants_cycle(spec: MoEDeploymentSpec, body: Mapping[str, Any]) -> bool:
    """Whether there is anything to do or clean up (otherwise the daemon makes no request)."""
    return (
        any(role.autoscaling for role in spec.roles)
        or bool(D.read(body.get("metadata") or {}))
        or bool((body.get("status") or {}).get("autoscaling"))
    )


def _patch(ctx: Context, spec: MoEDeploymentSpec, ops: list[dict[str, Any]]) -> None:
    ctx.kube.request(
        "PATCH",
        _path(L.KIND, spec.namespace, spec.name),
        L.PLURAL,
        body=ops,
        content_type="application/json-patch+json",
    )


def cycle(spec: MoEDeploymentSpec, body: Mapping[str, Any], ctx: Context) -> None:
    """One pass for one deployment (see the module docstring); `body` is a fresh GET of the object."""
    now = time.time()
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    ref = {"namespace": spec.namespace, "name": spec.name, "uid": metadata.get("uid", "")}
    autoscaled = {role.name: role for role in spec.roles if role.autoscaling}
    draining = D.read(metadata)
    # Drains of roles no longer autoscaled, or of groups that are gone, end here (the gateway routes again).
    stale = {
        g
        for g in draining
        if (owner := role_of(spec, g)) is None
        or owner[0] not in autoscaled
        or owner[1] >= spec.role(owner[0]).replicas
    }
    if stale:
        keep = {g: t for g, t in draining.items() if g not in stale}
        _patch(ctx, spec, D.annotation_ops(metadata, keep))
        draining = keep
    gone = tuple(r for r in (status.get("autoscaling") or {}) if r not in autoscaled)
    if not autoscaled:
        if gone or any(c.get("type") == CONDITION for c in status.get("conditions") or []):
            ctx.write_status(drop(gone, condition_too=True))
        return
    if gone:  # roles no longer autoscaled: their entries go, the others stay
        ctx.write_status(drop(gone, condition_too=False))
    error = (
        None
        if ctx.prometheus_url
        else (
            "no Prometheus is configured: set the chart's operator.prometheusUrl "
            "(MOEFLEET_OPERATOR_PROMETHEUS_URL)"
        )
    )
    absent: list[str] = []
    for name, role in autoscaled.items():
        entry = (status.get("autoscaling") or {}).get(name) or {}
        pending = entry.get("pending")
        if pending:
            _complete(spec, body, role, dict(pending), ctx, ref)
            continue
        mine = {g: t for g, t in draining.items() if (role_of(spec, g) or ("", 0))[0] == name}
        if mine:
            group, since = sorted(mine.items())[0]
            _continue_drain(spec, body, role, group, since, draining, status, ctx, now)
            continue
        raw: float | None = None
        if error is None:
            try:
                raw = query_signal(
                    ctx.prometheus,
                    ctx.prometheus_url,
                    A.signal_query(role.autoscaling.metric, spec.namespace, spec.name, name),  # type: ignore[union-attr]
                )
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                error = f"{ctx.prometheus_url}: {type(exc).__name__}: {exc}"
        if error is not None:
            DECISIONS.labels(name, "skipped_no_data").inc()
            ctx.write_status(
                set_entry(
                    name,
                    current=role.replicas,
                    desired=role.replicas,
                    reason=f"holding {role.replicas} group(s): Prometheus cannot be read",
                )
            )
            continue
        _decide(spec, body, role, raw, entry, status, ctx, ref, now, absent)
    _report_condition(spec, status, error, absent, autoscaled, ctx, ref, now)


def _decide(
    spec: MoEDeploymentSpec,
    body: Mapping[str, Any],
    role: RoleSpec,
    raw: float | None,
    entry: Mapping[str, Any],
    status: Mapping[str, Any],
    ctx: Context,
    ref: Mapping[str, str],
    now: float,
    absent: list[str],
) -> None:
    auto = role.autoscaling
    assert auto is not None
    if raw is None:
        absent.append(role.name)
        DECISIONS.labels(role.name, "skipped_no_data").inc()
    signal = A.per_group_signal(auto.metric, raw, role.replicas)
    ready = ((status.get("roles") or {}).get(role.name) or {}).get("readyGroups")
    decision = A.decide(
        auto,
        role.replicas,
        signal,
        history_of(entry),
        now,
        ready=int(ready) if isinstance(ready, int) else None,
    )
    history = [[round(t, 3), r] for t, r in decision.history[-HISTORY_LIMIT:]]
    common: dict[str, Any] = {
        "metric": auto.metric,
        "target": auto.target,
        "history": history,
        "signal": None if signal is None else round(signal, 4),
    }
    if decision.desired != role.replicas:
        _scale(
            spec, body, role, role.replicas, decision.desired, decision.reason, None, common, ctx, ref, now
        )
    elif decision.drain:
        group = L.group_name(spec.name, role.name, role.replicas - 1)
        _start_drain(spec, body, role, group, decision.reason, common, ctx, ref, now)
    else:
        ctx.write_status(
            set_entry(
                role.name, current=role.replicas, desired=role.replicas, reason=decision.reason, **common
            )
        )


def _scale(
    spec: MoEDeploymentSpec,
    body: Mapping[str, Any],
    role: RoleSpec,
    frm: int,
    to: int,
    reason: str,
    group: str | None,
    common: Mapping[str, Any],
    ctx: Context,
    ref: Mapping[str, str],
    now: float,
) -> None:
    pending: dict[str, Any] = {"from": frm, "to": to, "reason": reason, "time": timestamp(now)}
    if group is not None:
        pending["group"] = group
    # The intent first: a restarted operator finishes THIS change instead of deciding another one.
    ctx.write_status(set_entry(role.name, pending=pending, desired=to, reason=reason, **common))
    ctx.checkpoint("autoscale-intent")
    _complete(spec, body, role, pending, ctx, ref)


def _complete(
    spec: MoEDeploymentSpec,
    body: Mapping[str, Any],
    role: RoleSpec,
    pending: Mapping[str, Any],
    ctx: Context,
    ref: Mapping[str, str],
) -> None:
    """Finish a recorded intent: patch replicas unless already done, then report it once."""
    frm, to, group = int(pending["from"]), int(pending["to"]), pending.get("group")
    metadata = body.get("metadata") or {}
    replicas = raw_replicas(body, role.name)
    auto = role.autoscaling
    outcome = "scaled_up" if to > frm else "scaled_down"
    abandoned = ""
    if auto is not None and not auto.min_replicas <= to <= auto.max_replicas:
        abandoned = f"{to} group(s) is outside [{auto.min_replicas}, {auto.max_replicas}] now"
    elif replicas == frm:
        ops: list[dict[str, Any]] = []
        if "replicas" in (body["spec"]["roles"].get(role.name) or {}):
            ops.append({"op": "test", "path": f"/spec/roles/{role.name}/replicas", "value": frm})
        ops.append({"op": "add", "path": f"/spec/roles/{role.name}/replicas", "value": to})
        if group is not None:
            ops += D.annotation_ops(metadata, {g: t for g, t in D.read(metadata).items() if g != group})
        try:
            _patch(ctx, spec, ops)
        except KubeError as error:
            if error.status not in (409, 422):
                raise
            fresh = ctx.kube.get(L.KIND, spec.namespace, spec.name) or {}
            if raw_replicas(fresh, role.name) != to:
                abandoned = f"replicas changed to {raw_replicas(fresh, role.name)} meanwhile"
    elif replicas != to:
        abandoned = f"replicas changed to {replicas} meanwhile"
    ctx.checkpoint("autoscale-applied")
    if abandoned:
        if group is not None:
            left = {g: t for g, t in D.read(metadata).items() if g != group}
            _patch(ctx, spec, D.annotation_ops(metadata, left))
        DECISIONS.labels(role.name, "abandoned").inc()
        message = f"{role.name}: {frm} -> {to} group(s) dropped: {abandoned}"
        ctx.write_status(
            set_entry(role.name, pending=None, draining=None, drainStartTime=None, reason=message)
        )
        ctx.kube.create_event(ref, Event("Warning", "ScaleAbandoned", message))
        return
    reason = str(pending.get("reason") or "")
    ctx.write_status(
        set_entry(
            role.name,
            pending=None,
            draining=None,
            drainStartTime=None,
            current=to,
            desired=to,
            lastScaleTime=str(pending.get("time") or timestamp(time.time())),
            reason=reason,
        )
    )
    DECISIONS.labels(role.name, outcome).inc()
    what = f"removed group {group}" if group else f"{frm} -> {to} group(s)"
    ctx.kube.create_event(
        ref,
        Event("Normal", "ScaledUp" if to > frm else "ScaledDown", f"{role.name}: {what}: {reason}"[:1000]),
    )


def _start_drain(
    spec: MoEDeploymentSpec,
    body: Mapping[str, Any],
    role: RoleSpec,
    group: str,
    reason: str,
    common: Mapping[str, Any],
    ctx: Context,
    ref: Mapping[str, str],
    now: float,
) -> None:
    metadata = body.get("metadata") or {}
    draining = {**D.read(metadata), group: now}
    # The annotation is the durable record (and what the gateway config is rendered from): first.
    _patch(ctx, spec, D.annotation_ops(metadata, draining))
    ctx.checkpoint("autoscale-drain-recorded")
    ctx.write_status(draining_entry(role.name, role.replicas, group, now, reason, **common))
    DECISIONS.labels(role.name, "drain_started").inc()
    ctx.kube.create_event(
        ref,
        Event(
            "Normal",
            "DrainStarted",
            f"{role.name}: draining group {group} ({reason}); the gateway sends it no new requests and it "
            f"is removed once idle (at most {ctx.drain_timeout_seconds:g}s)",
        ),
    )


def _continue_drain(
    spec: MoEDeploymentSpec,
    body: Mapping[str, Any],
    role: RoleSpec,
    group: str,
    since: float,
    draining: Mapping[str, float],
    status: Mapping[str, Any],
    ctx: Context,
    now: float,
) -> None:
    auto = role.autoscaling
    assert auto is not None
    index = (role_of(spec, group) or ("", -1))[1]
    ref = {"namespace": spec.namespace, "name": spec.name, "uid": (body.get("metadata") or {}).get("uid", "")}
    if index != role.replicas - 1 or role.replicas - 1 < auto.min_replicas:
        # replicas or minReplicas were changed by hand during the drain: removing the group is wrong now
        left = {g: t for g, t in draining.items() if g != group}
        _patch(ctx, spec, D.annotation_ops(body.get("metadata") or {}, left))
        message = (
            f"{role.name}: drain of {group} stopped: the role now has {role.replicas} group(s) "
            f"(minReplicas {auto.min_replicas}); the gateway routes to it again"
        )
        DECISIONS.labels(role.name, "abandoned").inc()
        ctx.write_status(set_entry(role.name, draining=None, drainStartTime=None, reason=message))
        ctx.kube.create_event(ref, Event("Warning", "ScaleAbandoned", message))
        return
    groups = {g.get("name"): g for g in status.get("groups") or [] if isinstance(g, Mapping)}
    ready = (groups.get(group) or {}).get("phase") == READY
    busy = D.probe(ctx.prometheus, engine_url(ctx.engine_template, spec, group))
    state = D.drain_state(busy, ready, since, now, ctx.drain_grace_seconds, ctx.drain_timeout_seconds)
    if not state.done:
        ctx.write_status(
            draining_entry(role.name, role.replicas, group, since, f"group {group} {state.reason}")
        )
        return
    _scale(
        spec,
        body,
        role,
        role.replicas,
        role.replicas - 1,
        f"group {group} {state.reason}",
        group,
        {},
        ctx,
        ref,
        now,
    )


def _report_condition(
    spec: MoEDeploymentSpec,
    status: Mapping[str, Any],
    error: str | None,
    absent: list[str],
    autoscaled: Mapping[str, RoleSpec],
    ctx: Context,
    ref: Mapping[str, str],
    now: float,
) -> None:
    ready = readiness(error, absent, autoscaled)
    before: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == CONDITION), {}
    )
    new = condition(CONDITION, *ready, status, spec.generation, now)
    if before.get("status") == new["status"] and before.get("reason") == new["reason"]:
        if before.get("message") == new["message"]:
            return
    ctx.write_status(set_condition(new))
    if before.get("status") != new["status"] or before.get("reason") != new["reason"]:
        kind = "Normal" if ready[0] else "Warning"
        ctx.kube.create_event(ref, Event(kind, f"{CONDITION}{new['status']}", f"{ready[1]}: {ready[2]}"))
