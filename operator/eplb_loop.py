"""The EPLB trigger's side effects: read Prometheus, POST the engine's admin API, report in status and Events.

One cycle per `spec.eplb.interval`, run by a per-MoEDeployment asyncio task (handlers.py `_eplb_task`;
not a kopf daemon, which would put a finalizer on the object):
  Prometheus range query (httpx) -> eplb_trigger.decide (pure) -> for each chosen group:
  status says InProgress + lastRebalanceTime (written FIRST, so a restarted operator honours the cooldown
  and never asks twice) -> POST /admin/eplb/rebalance on the group's rank-0 pod with the deployment's admin
  bearer token -> status lastResult/rebalances + an Event with balancedness before and after.
Prometheus unreachable or a group's series absent -> EPLBReady=False (with the reason) and no rebalance.

The admin token lives in the Secret `<deployment>-admin` (key `token`), created by the reconcile before any
engine pod (ensure_admin_secret) and mounted into engine pods as MOEFLEET_ADMIN_TOKEN (render.py).
With an operator key (MOEFLEET_OPERATOR_ADMIN_KEY, from the chart's `<release>-admin-key` Secret through the
kubelet) the token is HMAC-SHA256(key, namespace/name/uid): the operator creates the Secret but never reads
one, so its RBAC grants `create` on Secrets and no `get` (it cannot read Secrets it did not create).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from moefleet.operator import eplb_trigger as T
from moefleet.operator import labels as L
from moefleet.operator.kube import Kube, KubeError
from moefleet.operator.spec import MoEDeploymentSpec
from moefleet.operator.status import Event, condition, parse_timestamp, timestamp
from prometheus_client import Counter

log = logging.getLogger(__name__)

CONDITION = "EPLBReady"
SECRET_KEY = "token"
DECISIONS = Counter(
    "moefleet_operator_eplb_decisions",
    "EPLB trigger outcomes per group: rebalanced, failed (the POST failed), skipped_no_data (Prometheus "
    "unreadable or the series absent)",
    ["outcome"],
)

# (namespace, deployment uid) whose admin Secret is known to exist: one create per deployment per process.
_KNOWN_SECRETS: set[tuple[str, str]] = set()

StatusWriter = Callable[[Callable[[dict[str, Any]], dict[str, Any]]], None]


# The operator's key for derived admin tokens (handlers.py sets it from the settings); "" = random tokens
# read back from the Secret (needs `get` on Secrets).
admin_key = ""


def admin_secret_name(deployment: str) -> str:
    return f"{deployment}-admin"


def derive_token(key: str, spec: MoEDeploymentSpec) -> str:
    """The deployment's admin token from the operator key (stable across operator restarts, per object uid)."""
    message = f"{spec.namespace}/{spec.name}/{spec.uid}".encode()
    digest = hmac.new(key.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def ensure_admin_secret(kube: Kube, spec: MoEDeploymentSpec, owner: Mapping[str, Any]) -> None:
    """Create `<name>-admin` with a random token once (owned by the MoEDeployment, so it is collected with
    it); an existing Secret is never rewritten (running engines keep their token)."""
    key = (spec.namespace, spec.uid)
    if key in _KNOWN_SECRETS:
        return
    name = admin_secret_name(spec.name)
    path = f"/api/v1/namespaces/{spec.namespace}/secrets"
    # Create first (one request): a 409 means it exists already, which must not be rewritten.
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": spec.namespace,
            "labels": L.common_labels(spec.name, L.COMPONENT_ENGINE),
            "ownerReferences": [dict(owner)],
        },
        "type": "Opaque",
        "stringData": {SECRET_KEY: derive_token(admin_key, spec) if admin_key else secrets.token_urlsafe(32)},
    }
    try:
        kube.request("POST", path, "secrets", body=body)
    except KubeError as error:
        if error.status != 409:  # 409: it exists (created earlier or by another worker): keep it
            raise
    _KNOWN_SECRETS.add(key)


def _read_token(kube: Kube, spec: MoEDeploymentSpec) -> str:
    if admin_key:
        return derive_token(admin_key, spec)
    secret = kube.request(
        "GET", f"/api/v1/namespaces/{spec.namespace}/secrets/{admin_secret_name(spec.name)}", "secrets"
    )
    return base64.b64decode(secret["data"][SECRET_KEY]).decode()


def engine_url(template: str, spec: MoEDeploymentSpec, group: str) -> str:
    """Base URL of a group's rank-0 pod. The default template is the pod's DNS name under its headless
    Service; tests (kwok runs no containers) point it at a local exporter: the documented
    MOEFLEET_OPERATOR_ENGINE_URL_TEMPLATE override."""
    return template.format(
        pod=f"{group}-0", group=group, namespace=spec.namespace, port=L.ENGINE_HTTP_PORT, deployment=spec.name
    ).rstrip("/")


def query_prometheus(client: httpx.Client, url: str, spec: MoEDeploymentSpec, now: float) -> Any:
    step = T.query_step(spec.eplb.window_seconds)
    response = client.get(
        f"{url.rstrip('/')}/api/v1/query_range",
        params={
            "query": T.range_query(spec.namespace, spec.name),
            "start": f"{now - spec.eplb.window_seconds:.3f}",
            "end": f"{now:.3f}",
            "step": f"{step:g}",
        },
    )
    if response.status_code >= 400 and not response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
    return T.parse_matrix(response.json())


def _merge_condition(status: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    others = [c for c in status.get("conditions") or [] if c.get("type") != new["type"]]
    return [*others, new]


def cycle(
    spec: MoEDeploymentSpec,
    ref: Mapping[str, str],
    status: Mapping[str, Any],
    kube: Kube,
    write_status: StatusWriter,
    prometheus: httpx.Client,
    prometheus_url: str,
    engine_template: str,
    admin_timeout: float,
) -> None:
    """One pass of the trigger for one deployment (see the module docstring)."""
    now = time.time()
    error: str | None = None
    series: dict[str, Any] = {}
    try:
        series = query_prometheus(prometheus, prometheus_url, spec, now)
    except (httpx.HTTPError, ValueError) as exc:
        error = f"{prometheus_url}: {type(exc).__name__}: {exc}"
    records = T.records_from_status(status.get("eplb") or {}, parse_timestamp)
    decision = T.decide(spec, series, records, now)
    if error is not None:
        decision = T.Decision(groups=decision.groups, rebalance=(), absent=decision.absent)
    if error is not None or decision.absent:
        DECISIONS.labels("skipped_no_data").inc(
            len(decision.absent) if error is None else len(decision.groups)
        )
    ready = T.readiness(decision, error)
    before: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == CONDITION), {}
    )
    new_condition = condition(CONDITION, *ready, status, spec.generation, now)

    def report(current: dict[str, Any]) -> dict[str, Any]:
        fresh = T.records_from_status(current.get("eplb") or {}, parse_timestamp)
        eplb = {**(current.get("eplb") or {}), **T.eplb_status(spec, decision, fresh, timestamp)}
        return {**current, "eplb": eplb, "conditions": _merge_condition(current, new_condition)}

    write_status(report)
    if before.get("status") != new_condition["status"] or before.get("reason") != new_condition["reason"]:
        kind = "Normal" if ready[0] else "Warning"
        kube.create_event(
            ref, Event(kind, f"{CONDITION}{new_condition['status']}", f"{ready[1]}: {ready[2]}")
        )
    for view in decision.rebalance:
        _rebalance(spec, ref, view, kube, write_status, engine_template, admin_timeout)


def _set_record(group: str, role: str, **fields: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def mutate(current: dict[str, Any]) -> dict[str, Any]:
        eplb = dict(current.get("eplb") or {})
        roles = {k: dict(v) for k, v in (eplb.get("roles") or {}).items()}
        role_entry = roles.setdefault(role, {"groups": {}})
        groups = dict(role_entry.get("groups") or {})
        entry = dict(groups.get(group) or {})
        if fields.pop("increment", False):
            entry["rebalances"] = int(entry.get("rebalances") or 0) + 1
        entry.update(fields)
        groups[group] = entry
        role_entry["groups"] = groups
        eplb["roles"] = roles
        return {**current, "eplb": eplb}

    return mutate


def _rebalance(
    spec: MoEDeploymentSpec,
    ref: Mapping[str, str],
    view: T.GroupView,
    kube: Kube,
    write_status: StatusWriter,
    engine_template: str,
    admin_timeout: float,
) -> None:
    requested = time.time()
    # Recorded before the POST: an operator killed during the request sees the cooldown after its restart.
    write_status(
        _set_record(view.group, view.role, lastRebalanceTime=timestamp(requested), lastResult=T.IN_PROGRESS)
    )
    url = f"{engine_url(engine_template, spec, view.group)}/admin/eplb/rebalance"
    try:
        token = _read_token(kube, spec)
        response = httpx.post(url, headers={"Authorization": f"Bearer {token}"}, timeout=admin_timeout)
        body = (
            response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        )
        if response.status_code >= 400:
            message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
            raise RuntimeError(f"HTTP {response.status_code}: {message or response.text[:200]}")
    except (httpx.HTTPError, KubeError, RuntimeError, ValueError, KeyError) as exc:
        DECISIONS.labels("failed").inc()
        result = f"Failed: {exc}"[:512]
        write_status(_set_record(view.group, view.role, lastResult=result))
        kube.create_event(
            ref,
            Event(
                "Warning",
                "RebalanceFailed",
                f"group {view.group}: POST {url} failed: {exc}; retried after the cooldown",
            ),
        )
        return
    DECISIONS.labels("rebalanced").inc()
    before = body.get("balancedness_before", view.balancedness)
    after = body.get("predicted_balancedness")
    moved = body.get("moved_experts")
    summary = f"balancedness {_fmt(before)} -> {_fmt(after)} (predicted), {moved} expert(s) moved"
    write_status(_set_record(view.group, view.role, lastResult=f"Succeeded: {summary}", increment=True))
    kube.create_event(
        ref,
        Event(
            "Normal",
            "Rebalanced",
            f"group {view.group}: {summary}; it stayed below {spec.eplb.threshold:g} for "
            f"{spec.eplb.window_seconds:g}s (lowest now {_fmt(view.balancedness)})",
        ),
    )


def _fmt(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, int | float) else "?"
