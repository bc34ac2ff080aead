"""The fleet as the operator sees it, on its /metrics: groups per phase, group restarts, autoscaled group counts.

Read from the MoEDeployment statuses the operator last read or wrote (handlers.py calls `observe` on each
reconcile and status write, `forget` on deletion), so a scrape costs no API request and the numbers are exactly
what `kubectl get moed` shows. Restarts come from status.groups[].restarts, which survives operator restarts,
so they are exported as a counter. Labels `namespace` and `deployment` name the MoEDeployment (the chart's
ServiceMonitor sets honorLabels so the operator's own namespace does not overwrite them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from moefleet.operator import status as S
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PHASES = (S.PENDING, S.FORMING, S.READY, S.RESTARTING, S.UPDATING, S.BACKOFF, S.FAILED, S.UNSCHEDULABLE)


class FleetCollector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: dict[tuple[str, str], Mapping[str, Any]] = {}

    def observe(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        with self._lock:
            self._statuses[(namespace, name)] = status

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._statuses.pop((namespace, name), None)

    def collect(self) -> Iterator[Metric]:
        groups = GaugeMetricFamily(
            "moefleet_operator_groups",
            "Engine groups per MoEDeployment, role and phase (status.groups[].phase)",
            labels=["namespace", "deployment", "role", "phase"],
        )
        restarts = CounterMetricFamily(
            "moefleet_operator_group_restarts",
            "Whole-group restarts the operator made, per group (status.groups[].restarts)",
            labels=["namespace", "deployment", "role", "group"],
        )
        scaling = GaugeMetricFamily(
            "moefleet_operator_autoscaling_groups",
            "Groups of autoscaled roles: current (spec replicas) and desired (the autoscaler's decision)",
            labels=["namespace", "deployment", "role", "kind"],
        )
        with self._lock:
            statuses = dict(self._statuses)
        for (namespace, name), status in sorted(statuses.items()):
            counts: dict[str, dict[str, int]] = {
                role: dict.fromkeys(PHASES, 0) for role in status.get("roles") or {}
            }
            for group in status.get("groups") or []:
                role, phase = str(group.get("role", "")), str(group.get("phase", S.PENDING))
                counts.setdefault(role, dict.fromkeys(PHASES, 0))
                counts[role][phase] = counts[role].get(phase, 0) + 1
                restarts.add_metric(
                    [namespace, name, role, str(group.get("name", ""))], float(group.get("restarts") or 0)
                )
            for role, by_phase in sorted(counts.items()):
                for phase, count in sorted(by_phase.items()):
                    groups.add_metric([namespace, name, role, phase], float(count))
            for role, entry in sorted((status.get("autoscaling") or {}).items()):
                for kind in ("current", "desired"):
                    if isinstance(entry.get(kind), int):
                        scaling.add_metric([namespace, name, role, kind], float(entry[kind]))
        yield groups
        yield restarts
        yield scaling


COLLECTOR = FleetCollector()
REGISTRY.register(COLLECTOR)  # type: ignore[arg-type]
