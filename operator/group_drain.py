"""Draining a group before the autoscaler removes it: the durable record, the gateway seam and the end test.

The record is the MoEDeployment annotation `moefleet.ai/draining`: JSON {group: RFC 3339 start}. It is
written before anything else happens, so an operator restarted mid-drain continues the same drain (same
group, same start) instead of choosing again. The reconcile parses it into `spec.draining_groups` and renders
the group with `"draining": true` in the gateway's config file (the shared schema, moefleet/gateway_schema.py);
the gateway re-reads its mounted config and stops sending the group new requests.

A drain ends when the group has nothing in flight (`moefleet_num_requests_running` + `_waiting` on its rank-0
/metrics are 0) and at least `grace` seconds have passed since it began (the kubelet takes up to about a
minute to update a mounted ConfigMap, so until then the gateway may still route to it), or when `timeout`
seconds have passed whatever the group says. A group whose rank-0 cannot be read counts as idle only when it
is not Ready (a pending or failed group serves nothing); a Ready one that does not answer waits for the
timeout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from moefleet.operator import labels as L
from moefleet.operator.status import parse_timestamp, timestamp
from prometheus_client.parser import text_string_to_metric_families

IN_FLIGHT_METRICS = ("moefleet_num_requests_running", "moefleet_num_requests_waiting")
# JSON patch path of the annotation (`/` in the key is escaped as `~1`).
ANNOTATION_PATH = "/metadata/annotations/" + L.DRAINING_ANNOTATION.replace("~", "~0").replace("/", "~1")


def read(metadata: Mapping[str, Any]) -> dict[str, float]:
    """The draining annotation -> {group: start (unix time)}; an unreadable value counts as no drain."""
    text = (metadata.get("annotations") or {}).get(L.DRAINING_ANNOTATION)
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    out = {}
    for group, since in value.items():
        try:
            out[str(group)] = parse_timestamp(str(since))
        except ValueError:
            continue
    return out


def encode(draining: Mapping[str, float]) -> str:
    return json.dumps({group: timestamp(since) for group, since in sorted(draining.items())}, sort_keys=True)


def annotation_ops(metadata: Mapping[str, Any], draining: Mapping[str, float]) -> list[dict[str, Any]]:
    """JSON patch operations that set the annotation to `draining` ("{}" when none: the key stays)."""
    ops: list[dict[str, Any]] = []
    if not metadata.get("annotations"):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append({"op": "add", "path": ANNOTATION_PATH, "value": encode(draining)})
    return ops


def in_flight(metrics_text: str) -> int:
    """Requests running or waiting in a group, from its rank-0 /metrics (per-rank series are summed)."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in IN_FLIGHT_METRICS:
                total += sample.value
    return int(total)


def probe(client: httpx.Client, base_url: str) -> int | None:
    """In-flight requests of a group, or None when its /metrics cannot be read."""
    try:
        response = client.get(f"{base_url}/metrics")
        if response.status_code != 200:
            return None
        return in_flight(response.text)
    except (httpx.HTTPError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class DrainState:
    done: bool
    reason: str


def drain_state(
    in_flight_now: int | None, group_ready: bool, since: float, now: float, grace: float, timeout: float
) -> DrainState:
    """Whether a draining group may be removed now (pure; see the module docstring)."""
    elapsed = now - since
    if elapsed >= timeout:
        what = "unreadable" if in_flight_now is None else f"{in_flight_now} request(s) in flight"
        return DrainState(True, f"drain timeout {timeout:g}s reached ({what})")
    if in_flight_now is None and group_ready:
        return DrainState(False, f"draining for {elapsed:.0f}s: its /metrics cannot be read")
    busy = in_flight_now or 0
    if busy:
        return DrainState(False, f"draining for {elapsed:.0f}s: {busy} request(s) in flight")
    if elapsed < grace:
        return DrainState(False, f"draining for {elapsed:.0f}s: idle, waiting {grace:g}s for the gateway")
    return DrainState(True, f"drained in {elapsed:.0f}s (no request in flight)")
