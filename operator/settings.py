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
    # Status batching (like kube-controller-manager's --endpointslice-updates-batch-period): a status change
    # that is only progress (ready-node counts, Pending -> Forming, the gateway's ready count, condition
    # messages) is written at most once per this many seconds; every other change is written at once
    # (status.write_due). 0 writes every change at once.
    status_batch_seconds: float = 10.0
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
    # Seconds between autoscaling cycles of each MoEDeployment with spec.roles.<role>.autoscaling (the HPA's
    # default sync period).
    autoscale_interval_seconds: float = 15.0
    # A drained group is removed once idle AND this long after its drain began (the kubelet needs up to about
    # a minute to show the gateway its updated ConfigMap), or after the timeout whatever it says.
    drain_grace_seconds: float = 90.0
    drain_timeout_seconds: float = 600.0
    # Test-only fault injection: the process exits right after the named step (e.g. autoscale-intent), so a
    # test can prove a restarted operator does not repeat a decision. Empty in production.
    fault_exit_after: str = ""
    # Accept spec.model.volume.hostPath (a node directory in every engine pod); chart: operator.allowHostPath.
    allow_host_path: bool = False
    # The operator's own namespace (the chart sets it): engine NetworkPolicies let its pods reach the
    # engines' HTTP port (EPLB admin calls).
    namespace: str = ""
    # Namespace of the Prometheus that scrapes the engines (NetworkPolicies let it reach the HTTP port
    # unless a MoEDeployment sets spec.networkPolicy.metricsFrom); empty: no scraper is let in by default.
    metrics_namespace: str = "monitoring"
    # Key the engines' admin tokens are derived from (eplb_loop.derive_token; the chart passes its
    # `<release>-admin-key` Secret). Empty: random tokens read back from each Secret (needs `get` on Secrets).
    admin_key: str = ""
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
        if self.autoscale_interval_seconds <= 0:
            raise ValueError(
                f"{PREFIX}AUTOSCALE_INTERVAL_SECONDS ({self.autoscale_interval_seconds}) must be > 0"
            )
        if self.drain_timeout_seconds < self.drain_grace_seconds:
            raise ValueError(
                f"{PREFIX}DRAIN_TIMEOUT_SECONDS ({self.drain_timeout_seconds}) must be >= "
                f"{PREFIX}DRAIN_GRACE_SECONDS ({self.drain_grace_seconds})"
            )
        if self.status_batch_seconds < 0:
            raise ValueError(f"{PREFIX}STATUS_BATCH_SECONDS ({self.status_batch_seconds}) must be >= 0")
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
        if kind is bool:
            if env[key].lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{key}={env[key]!r} is not a boolean (true or false)")
            values[field.name] = env[key].lower() in ("true", "1")
            continue
        try:
            values[field.name] = kind(env[key])
        except ValueError:
            raise ValueError(f"{key}={env[key]!r} is not a valid {kind.__name__}") from None
    return OperatorSettings(**values)  # type: ignore[arg-type]
