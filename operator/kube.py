"""THE module that talks to the Kubernetes API (kopf's own watches aside). Every request is counted.

Writes are server-side apply (field manager `moefleet-operator`) so an applied object converges to exactly
the rendered one; `execute` runs a planner.Plan: apply children -> pod readiness gates -> write status -> delete pods -> events.
The status is written before the pods are deleted, so an operator killed in between remembers the restart
(and its backoff) instead of restarting the group twice.
"""

from __future__ import annotations

import itertools
import logging
import os
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import httpx
from moefleet.operator import labels as L
from moefleet.operator.planner import Plan
from moefleet.operator.status import Event
from prometheus_client import Counter as PromCounter

log = logging.getLogger(__name__)

API_REQUESTS = PromCounter(
    "moefleet_operator_api_requests",
    "Kubernetes API requests made by the operator (kopf's watch streams not included)",
    ["verb", "resource"],
)

# kind -> (API path prefix, plural); namespaced resources only.
RESOURCES: dict[str, tuple[str, str]] = {
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "PodMonitor": ("/apis/monitoring.coreos.com/v1", "podmonitors"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    L.KIND: (f"/apis/{L.API_VERSION}", L.PLURAL),
}
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
# Repeats of one Event within this window update its count (Kubernetes' event correlator uses 10 minutes).
EVENT_AGGREGATION_SECONDS = 600.0
EVENT_CACHE_SIZE = 4096
_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def throttle_delay(retry_after: str | None, attempt: int) -> float:
    """Pure: seconds to wait before resending a request refused with 429: the server's Retry-After (seconds)
    when it sends one (at most 10), else 0.5 s doubling per attempt up to 5 s."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), 10.0)
        except ValueError:
            pass  # an HTTP date: use our own backoff
    return min(0.5 * 2**attempt, 5.0)


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def _event_body(spec_ref: Mapping[str, str], event: Event, name: str, now: str) -> dict[str, Any]:
    namespace = spec_ref["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": {
            "apiVersion": L.API_VERSION,
            "kind": L.KIND,
            "name": spec_ref["name"],
            "namespace": namespace,
            "uid": spec_ref["uid"],
        },
        "reason": event.reason,
        "message": event.message[:1024],
        "type": event.type,
        "source": {"component": L.EVENT_SOURCE},
        "reportingComponent": L.EVENT_SOURCE,
        "reportingInstance": os.environ.get("HOSTNAME", L.EVENT_SOURCE),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class Kube:
    """A small synchronous client: apply / delete / patch status / events / get, with request counters."""

    def __init__(
        self, kubeconfig: str | None = None, timeout: float = 30.0, throttle_budget_s: float = 30.0
    ) -> None:
        from kubernetes import config as kube_config
        from kubernetes.client import Configuration

        configuration = Configuration()
        self._in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
        if self._in_cluster:
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            kube_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        headers = {}
        token = (configuration.api_key or {}).get("authorization") or (configuration.api_key or {}).get(
            "BearerToken"
        )
        if token:
            headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        context: Any = False
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
        self._client = httpx.Client(
            base_url=configuration.host, headers=headers, verify=context, timeout=timeout
        )
        self._token_read_at = time.monotonic()
        # Most seconds (and at most 10 resends) one request waits out 429s before failing.
        self.throttle_budget_s = throttle_budget_s
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self._crd_cache: dict[str, tuple[bool, float]] = {}
        self._crd_lock = threading.Lock()  # one lookup per CRD and cache period, however many workers ask
        # (namespace, uid, type, reason, message) -> (event name, count, first posted at, monotonic)
        self._events: dict[tuple[str, str, str, str, str], tuple[str, int, float]] = {}

    # -- plumbing -------------------------------------------------------------------------------------
    def _refresh_token(self) -> None:
        # Bound service-account tokens rotate; the kubelet rewrites the file, so re-read it every minute.
        if self._in_cluster and time.monotonic() - self._token_read_at > 60:
            with open(os.path.join(_SA_DIR, "token")) as f:
                self._client.headers["Authorization"] = f"Bearer {f.read().strip()}"
            self._token_read_at = time.monotonic()

    def request(
        self,
        verb: str,
        path: str,
        resource: str,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """One API request; returns the decoded JSON (None for a 404 when missing_ok)."""
        self._refresh_token()
        with self._lock:
            self.requests[(verb, resource)] += 1
        API_REQUESTS.labels(verb, resource).inc()
        headers = {"Content-Type": content_type} if body is not None else {}
        response = self._client.request(verb, path, json=body, headers=headers, params=params)
        waited = 0.0
        for attempt in itertools.count():
            # 429: API Priority and Fairness throttled us, or the storage is (re)initializing. The server
            # refused before doing anything, so any verb is safe to send again (as client-go does).
            if response.status_code != 429 or waited >= self.throttle_budget_s or attempt >= 10:
                break
            delay = min(throttle_delay(response.headers.get("Retry-After"), attempt), self.throttle_budget_s)
            log.info("%s %s throttled (429); retrying in %.1fs", verb, path, delay)
            time.sleep(delay)
            waited += delay
            with self._lock:
                self.requests[(verb, resource)] += 1
            API_REQUESTS.labels(verb, resource).inc()
            response = self._client.request(verb, path, json=body, headers=headers, params=params)
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise KubeError(response.status_code, f"{verb} {path}: {message}")
        return response.json() if response.content else None

    @property
    def writes(self) -> int:
        with self._lock:
            return sum(n for (verb, _), n in self.requests.items() if verb in WRITE_VERBS)

    def close(self) -> None:
        self._client.close()

    # -- operations -----------------------------------------------------------------------------------
    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Server-side apply: create or converge `obj` (fields this manager no longer sets are removed)."""
        metadata = obj["metadata"]
        return self.request(
            "PATCH",
            _path(obj["kind"], metadata["namespace"], metadata["name"]),
            RESOURCES[obj["kind"]][1],
            body=obj,
            content_type="application/apply-patch+yaml",  # JSON is YAML
            params={"fieldManager": L.FIELD_MANAGER, "force": "true"},
        )

    def delete(
        self, kind: str, namespace: str, name: str, uid: str = "", grace_seconds: int | None = None
    ) -> None:
        """Delete (404 is fine); dependents (a StatefulSet's pods) go in the background. With `uid`, only
        that very object (a precondition: a same-named replacement is never deleted; HTTP 409 is fine,
        the object we meant is gone). `grace_seconds=0`: a force delete."""
        options: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid:
            options["preconditions"] = {"uid": uid}
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        try:
            self.request(
                "DELETE", _path(kind, namespace, name), RESOURCES[kind][1], body=options, missing_ok=True
            )
        except KubeError as error:
            if error.status != 409 or not uid:
                raise
            log.info("%s %s/%s was already replaced (uid %s gone): not deleted", kind, namespace, name, uid)

    def failed_create(self, namespace: str, statefulset: str) -> str | None:
        """The newest FailedCreate Event of a StatefulSet (quota, Pod Security admission, ...): the API
        server's message, or None."""
        selector = f"involvedObject.kind=StatefulSet,involvedObject.name={statefulset},reason=FailedCreate"
        found = self.request("GET", _path("Event", namespace), "events", params={"fieldSelector": selector})
        items = (found or {}).get("items") or []
        if not items:
            return None
        newest = max(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return str(newest.get("message") or "FailedCreate")

    def lease_request(self, verb: str, path: str, body: Any) -> Any:
        """For leader.Elector: one request on a coordination.k8s.io Lease (None for 404 on GET)."""
        return self.request(verb, path, "leases", body=body, missing_ok=verb == "GET")

    def get(self, kind: str, namespace: str, name: str) -> Any:
        return self.request("GET", _path(kind, namespace, name), RESOURCES[kind][1], missing_ok=True)

    def replace_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Any:
        """Set the whole status (JSON patch `add` replaces it), so stale keys never linger."""
        return self.request(
            "PATCH",
            _path(L.KIND, namespace, name, "status"),
            f"{L.PLURAL}/status",
            body=[{"op": "add", "path": "/status", "value": status}],
            content_type="application/json-patch+json",
        )

    def set_group_ready(self, namespace: str, pod: str, ready: bool, foreign: bool = False) -> None:
        """Set the pod's group-ready condition (its readiness gate); a vanished pod is fine. `foreign`: it
        closes a gate another writer opened (counted as resource `pods/status:foreign-gate`)."""
        condition = {
            "type": L.GROUP_READY_CONDITION,
            "status": "True" if ready else "False",
            "reason": L.GATE_REASONS[0] if ready else L.GATE_REASONS[1],
            "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.request(
            "PATCH",
            _path("Pod", namespace, pod, "status"),
            "pods/status:foreign-gate" if foreign else "pods/status",
            body={"status": {"conditions": [condition]}},  # strategic merge: conditions merge by type
            content_type="application/strategic-merge-patch+json",
            missing_ok=True,
        )

    def create_event(self, spec_ref: Mapping[str, str], event: Event) -> None:
        """A core/v1 Event on the MoEDeployment (kubectl describe shows them). Repeats are aggregated as
        Kubernetes does: the same (object, type, reason, message) within EVENT_AGGREGATION_SECONDS bumps
        `count` and `lastTimestamp` of the existing Event instead of creating another one."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        namespace = spec_ref["namespace"]
        key = (namespace, spec_ref["uid"], event.type, event.reason, event.message[:1024])
        with self._lock:
            seen = self._events.get(key)
        try:
            if seen is not None and time.monotonic() - seen[2] < EVENT_AGGREGATION_SECONDS:
                name, count = seen[0], seen[1] + 1
                patched = self.request(
                    "PATCH",
                    _path("Event", namespace, name),
                    "events",
                    body={"count": count, "lastTimestamp": now},
                    content_type="application/merge-patch+json",
                    missing_ok=True,
                )
                if patched is not None:
                    with self._lock:
                        self._events[key] = (name, count, seen[2])
                    return
            name = f"{spec_ref['name']}.{uuid.uuid4().hex[:16]}"
            self.request(
                "POST", _path("Event", namespace), "events", body=_event_body(spec_ref, event, name, now)
            )
            with self._lock:
                if len(self._events) >= EVENT_CACHE_SIZE:  # forget the oldest (insertion order)
                    self._events.pop(next(iter(self._events)))
                self._events[key] = (name, 1, time.monotonic())
        except (KubeError, httpx.HTTPError) as error:  # events are best effort
            log.warning("could not post event %s: %s", event.reason, error)

    def crd_exists(self, name: str, cache_seconds: float = 60.0) -> bool:
        """Is this CRD installed? (cached; False when not allowed to look). Worker threads that miss the
        cache together wait for one lookup instead of each making its own (single flight)."""
        cached = self._crd_cache.get(name)
        if cached and time.monotonic() - cached[1] < cache_seconds:
            return cached[0]
        with self._crd_lock:
            cached = self._crd_cache.get(name)  # another worker may have looked while this one waited
            if cached and time.monotonic() - cached[1] < cache_seconds:
                return cached[0]
            try:
                found = (
                    self.request(
                        "GET",
                        f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
                        "customresourcedefinitions",
                        missing_ok=True,
                    )
                    is not None
                )
            except KubeError as error:
                log.warning("cannot read CRD %s (%s); assuming it is absent", name, error)
                found = False
            self._crd_cache[name] = (found, time.monotonic())
            return found

    def execute(
        self, ref: Mapping[str, str], plan: Plan, write_status: bool, events: list[Event]
    ) -> tuple[Any, dict[tuple[str, str], int]]:
        """Run a plan for the MoEDeployment `ref` ({namespace, name, uid}). Returns the status write's
        response (None when the status was unchanged) and the resourceVersion of every applied child."""
        namespace = ref["namespace"]
        applied: dict[tuple[str, str], int] = {}
        for obj in plan.apply:
            response = self.apply(obj) or {}
            version = (response.get("metadata") or {}).get("resourceVersion") or 0
            applied[(obj["kind"], obj["metadata"]["name"])] = int(version)
        for child in plan.delete:
            self.delete(child.kind, namespace, child.name, uid=child.uid)
        # Gates before the status, so Ready=True is never reported while the gateway cannot route yet.
        for pod, ready in plan.pod_gates:
            self.set_group_ready(namespace, pod, ready, foreign=pod in plan.foreign_gates)
        response = self.replace_status(namespace, ref["name"], plan.status) if write_status else None
        for pods in plan.delete_pods.values():
            for pod in pods:
                self.delete("Pod", namespace, pod, uid=plan.pod_uids.get(pod, ""))
        for pod, uid in plan.force_delete:
            self.delete("Pod", namespace, pod, uid=uid, grace_seconds=0)
        for event in events:
            self.create_event(ref, event)
        return response, applied
