"""Operator settings from environment variables prefixed MOEFLEET_OPERATOR_ (read once at import)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

PREFIX = "MOEFLEET_OPERATOR_"


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    # Seconds between periodic reconciles of each MoEDeployment (children are watched through kopf
    # indexes, so a reconcile with nothing to do makes no API request).
    resync_seconds: float = 10.0
    # Image used when a MoEDeployment does not set spec.image (the chart sets it to its own image).
    default_image: str = "ghcr.io/moefleet/moefleet:latest"
    # Port of the operator's Prometheus endpoint (API request counters); 0 disables it.
    metrics_port: int = 0
    # Kopf's worker threads for the (synchronous) handlers.
    workers: int = 8
    # Seconds a "does the PodMonitor CRD exist?" answer is cached.
    crd_cache_seconds: float = 60.0
    # Kubernetes API request timeout in seconds.
    request_timeout_seconds: float = 30.0
    # Prometheus base URL the EPLB trigger queries (e.g. http://prometheus-operated.monitoring:9090);
    # empty = the trigger is idle (status.eplb is not written, nothing is rebalanced).
    prometheus_url: str = ""
    # Seconds a Prometheus query may take.
    prometheus_timeout_seconds: float = 10.0
    # Base URL of a group's rank-0 engine pod; {pod} {group} {namespace} {port} {deployment} are filled in.
    # Only tests change it (kwok runs no containers, so they point it at a local exporter).
    engine_url_template: str = "http://{pod}.{group}.{namespace}.svc:{port}"
    # Seconds a POST /admin/eplb/rebalance may take (the engine answers when the rebalance is done).
    admin_timeout_seconds: float = 600.0
    # Leader election (operator/leader.py): the namespace of the Lease; empty = no election, this process
    # always acts (one replica, or out of the cluster). The chart sets it to the release namespace.
    leader_election_namespace: str = ""
    # Name of the Lease and its timing (client-go's defaults: 15 s / 10 s / 2 s).
    leader_election_lease_name: str = "moefleet-operator"
    leader_election_lease_seconds: float = 15.0
    leader_election_renew_deadline_seconds: float = 10.0
    leader_election_retry_seconds: float = 2.0
    # A pod still Terminating this many seconds after its deletion deadline (deletionTimestamp), on a node
    # that is NotReady or gone, is force-deleted (grace 0, uid precondition) so its StatefulSet can
    # recreate it. Its kubelet is unreachable, so nothing else would ever finish the deletion.
    force_delete_after_seconds: float = 300.0
    # Retry of a failed apply (Degraded ApplyFailed): base * 2^(n-1) seconds, capped.
    apply_backoff_base_seconds: float = 2.0
    apply_backoff_max_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.resync_seconds <= 0:
            raise ValueError(f"{PREFIX}RESYNC_SECONDS ({self.resync_seconds}) must be > 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"{PREFIX}METRICS_PORT ({self.metrics_port}) must be in 0..65535")
        if self.workers < 1:
            raise ValueError(f"{PREFIX}WORKERS ({self.workers}) must be >= 1")
        if self.force_delete_after_seconds < 0:
            raise ValueError(
                f"{PREFIX}FORCE_DELETE_AFTER_SECONDS ({self.force_delete_after_seconds}) must be >= 0"
            )


def from_environment(environ: dict[str, str] | None = None) -> OperatorSettings:
    """Build settings from MOEFLEET_OPERATOR_<FIELD> variables; a bad value raises naming the variable."""
    env = os.environ if environ is None else environ
    defaults = OperatorSettings()
    values: dict[str, object] = {}
    for field in dataclasses.fields(OperatorSettings):
        key = PREFIX + field.name.upper()
        if key not in env:
            continue
        kind = type(getattr(defaults, field.name))
        try:
            values[field.name] = kind(env[key])
        except ValueError:
            raise ValueError(f"{key}={env[key]!r} is not a valid {kind.__name__}") from None
    return OperatorSettings(**values)  # type: ignore[arg-type]
