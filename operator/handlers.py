"""Thin kopf handlers: parse the body -> render -> plan -> execute -> status.

Children and pods are watched through kopf indexes (in-memory, kept current by watch streams), so a
reconcile reads nothing from the API and, when nothing changed, writes nothing. A reconcile runs on every
MoEDeployment watch event (spec changes act at once), on every engine pod failure (its owner, at once), and
from the resync loop every MOEFLEET_OPERATOR_RESYNC_SECONDS, which notices everything else (e.g. a group
becoming Ready). Kopf's own event posting is off: the operator posts its decisions as Events itself
(kube.py), so every request it makes is counted.

Never stuck: no kopf timer or daemon is registered for MoEDeployments, because kopf puts a finalizer on
every object a timer or daemon serves and a MoEDeployment (or its namespace) then cannot be deleted while
the operator is down. The periodic resync and the EPLB trigger run instead as one operator-wide loop
(`_resync_loop`) over the MoEDeployment index. Nothing here needs to act at deletion: the owner references
garbage-collect every child. An old object's finalizer `moefleet.ai/operator` is removed by kopf.

HA: with MOEFLEET_OPERATOR_LEADER_ELECTION_NAMESPACE set, several replicas run; each watches (its indexes
stay warm), only the holder of the Lease (leader.py) reconciles and writes.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import kopf
from moefleet.operator import (
    autoscale_loop,
    eplb_loop,
    fleet_metrics,
    gang,
    gang_sync,
    planner,
    render,
    security,
)
from moefleet.operator import labels as L
from moefleet.operator.kube import Kube, KubeError
from moefleet.operator.leader import Elector, LeaseTiming
from moefleet.operator.observed import (
    APPLIED_TTL,
    ChildState,
    Failure,
    applied_memo_expired,
    child_state,
    node_ready,
    pod_failed,
    pod_state,
)
from moefleet.operator.settings import OperatorSettings, from_environment
from moefleet.operator.spec import SpecError, parse
from moefleet.operator.status import condition_events, invalid_spec_status, with_degraded, write_due

log = logging.getLogger(__name__)

SETTINGS: OperatorSettings = from_environment()
_OWNED = {L.MANAGED_BY: L.MANAGED_BY_VALUE}
# (kind, kopf resource args, index id)
_CHILD_INDEXES = (
    ("StatefulSet", ("apps", "v1", "statefulsets"), "moefleet_statefulsets"),
    ("Service", ("", "v1", "services"), "moefleet_services"),
    ("ConfigMap", ("", "v1", "configmaps"), "moefleet_configmaps"),
    ("Deployment", ("apps", "v1", "deployments"), "moefleet_deployments"),
    ("PodDisruptionBudget", ("policy", "v1", "poddisruptionbudgets"), "moefleet_pdbs"),
    ("NetworkPolicy", ("networking.k8s.io", "v1", "networkpolicies"), "moefleet_networkpolicies"),
)
_CHILD_KINDS = tuple(kind for kind, _, _ in _CHILD_INDEXES)
_APPLIED_TTL = APPLIED_TTL  # seconds a gate write overrides a (possibly stale) pod index entry


class _State:
    """Process-wide memory: the API client, per-object locks and what the watches have not caught up on."""

    def __init__(self) -> None:
        self.kube: Kube | None = None
        self.closing = False
        # (namespace, deployment) -> {(pod, uid): (gate value written, when)}: gate writes the watch may lag
        self.gates: dict[tuple[str, str], dict[tuple[str, str], tuple[bool, float]]] = {}
        self.guard = threading.Lock()
        self.locks: dict[tuple[str, str], threading.Lock] = {}
        self.failures: dict[tuple[str, str], Failure] = {}  # (namespace, group) -> latest pod failure
        # (namespace, deployment) -> {(kind, name): (hash, resourceVersion, when)}: our applies the watches
        # may not show yet (a drift re-apply keeps the hash, so the resourceVersion says when it is seen)
        self.applied: dict[tuple[str, str], dict[tuple[str, str], tuple[str, int, float]]] = {}
        # (namespace, name) -> child -> when its kind's watch was first seen past the applied version
        self.watch_passed: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
        self.written_status: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}  # -> (rv, status)
        self.status_written_at: dict[tuple[str, str], float] = {}  # -> monotonic time of the last write
        self.indexes: Mapping[str, Any] | None = None  # kopf's index objects (live; captured from a handler)
        self.elector: Elector | None = None
        self.elector_thread: threading.Thread | None = None
        # (namespace, name) -> (failed applies in a row, retry not before (monotonic), generation then)
        self.apply_backoff: dict[tuple[str, str], tuple[int, float, int]] = {}
        # (namespace, statefulset) -> (checked at (monotonic), FailedCreate message or None)
        self.create_checks: dict[tuple[str, str], tuple[float, str | None]] = {}
        self.resync_task: asyncio.Task[None] | None = None
        self.eplb_tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.autoscale_tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def client(self) -> Kube:
        with self.guard:
            if self.kube is None:
                self.kube = Kube(timeout=SETTINGS.request_timeout_seconds)
            return self.kube

    def lock(self, key: tuple[str, str]) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(key, threading.Lock())


STATE = _State()


def leading() -> bool:
    """This replica may act: no election configured, or it holds the Lease."""
    return STATE.elector is None or STATE.elector.is_leader()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise; see the metrics
    settings.posting.enabled = False  # decisions are posted by kube.py (counted); no kopf chatter
    settings.peering.standalone = True  # one replica (chart), no peering CRDs
    # No handler needs a finalizer any more (no kopf timers/daemons); kopf removes this one from objects an
    # older operator finalized, so upgrading unblocks their deletion.
    settings.persistence.finalizer = "moefleet.ai/operator"
    settings.execution.max_workers = SETTINGS.workers
    eplb_loop.admin_key = SETTINGS.admin_key  # derived admin tokens: no Secret is ever read
    settings.watching.server_timeout = 300
    # Children are watched through a server-side label selector: only our objects cross the wire.
    owned = ",".join(f"{key}={value}" for key, value in _OWNED.items())
    settings.watching.label_selectors["", "v1", "pods"] = owned
    for _kind, resource, _index_id in _CHILD_INDEXES:
        settings.watching.label_selectors[resource] = owned
    # No namespace/CRD observation (it needs namespace list/watch); the CRD exists before the operator starts.
    # (The moefleet_crds index watches a few named CRDs: that is not kopf's resource scanning.)
    settings.scanning.disabled = True
    if SETTINGS.metrics_port:
        from prometheus_client import disable_created_metrics, start_http_server

        disable_created_metrics()  # no `_created` series: /metrics passes `promtool check metrics`
        start_http_server(SETTINGS.metrics_port)
    kube = STATE.client()
    if SETTINGS.leader_election_namespace:
        identity = f"{os.environ.get('HOSTNAME') or 'moefleet-operator'}_{uuid.uuid4().hex[:8]}"
        timing = LeaseTiming(
            SETTINGS.leader_election_lease_seconds,
            SETTINGS.leader_election_renew_deadline_seconds,
            SETTINGS.leader_election_retry_seconds,
        )
        STATE.elector = Elector(
            kube.lease_request,
            SETTINGS.leader_election_namespace,
            SETTINGS.leader_election_lease_name,
            identity,
            timing,
        )
        STATE.elector_thread = threading.Thread(target=STATE.elector.run, name="moefleet-leader", daemon=True)
        STATE.elector_thread.start()
    STATE.resync_task = asyncio.get_running_loop().create_task(_resync_loop())


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    STATE.closing = True  # a loop or event handler still running must not fail on the closed client
    for task in [STATE.resync_task, *STATE.eplb_tasks.values(), *STATE.autoscale_tasks.values()]:
        if task is not None:
            task.cancel()
    if STATE.elector is not None:
        STATE.elector.stop()
        if STATE.elector_thread is not None:  # its last renewal finishes before the release
            await asyncio.to_thread(STATE.elector_thread.join, SETTINGS.request_timeout_seconds)
        await asyncio.to_thread(STATE.elector.release)  # hand over at once (a rolling update)
    if STATE.kube is not None:
        STATE.kube.close()


# -- indexes: what exists, kept current by kopf's watch streams ----------------------------------------------
@kopf.index("", "v1", "pods", labels={**_OWNED, L.COMPONENT: L.COMPONENT_ENGINE})
def moefleet_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    return {(namespace, labels.get(L.DEPLOYMENT, "")): pod_state(body)}


# kind -> the highest resourceVersion its watch has delivered to the child index (observed.applied_memo_expired)
_WATCH_PROGRESS: dict[str, int] = {}
_WATCH_PROGRESS_LOCK = threading.Lock()


def _child_indexer(kind: str) -> Any:
    def index(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
        state = child_state({**body, "kind": kind})
        with _WATCH_PROGRESS_LOCK:
            if state.resource_version > _WATCH_PROGRESS.get(kind, 0):
                _WATCH_PROGRESS[kind] = state.resource_version
        return {(namespace, labels.get(L.DEPLOYMENT, "")): state}

    return index


for _kind, _resource, _index_id in _CHILD_INDEXES:
    kopf.index(*_resource, labels=_OWNED, id=_index_id)(_child_indexer(_kind))


@kopf.index("", "v1", "nodes")
def moefleet_nodes(name: str, body: kopf.Body, **_: Any) -> Any:
    """node -> Ready (and not tainted unreachable): a NotReady node makes its groups not Ready at once."""
    return {name: node_ready(body)}


class _NodeReady(Mapping[str, bool]):
    """The node index as node -> Ready (a node missing from it is gone)."""

    def __init__(self, index: Any) -> None:
        self._index = index

    def __getitem__(self, node: str) -> bool:
        store = self._index.get(node)
        if not store:
            raise KeyError(node)
        return all(store)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


# The CRDs whose presence changes what a reconcile renders: the PodMonitor's and the gang schedulers'.
_WATCHED_CRDS = frozenset({L.PODMONITOR_CRD, *(backend.crd for backend in gang.BACKENDS)})


@kopf.index(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    when=lambda name, **_: name in _WATCHED_CRDS,
)
def moefleet_crds(name: str, body: kopf.Body, **_: Any) -> Any:
    """CRD name -> Established: watched, so knowing whether a CRD exists costs no request per reconcile
    (a poll would also make requests while nothing changes)."""
    conditions = body.get("status", {}).get("conditions") or []
    return {name: any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)}


def _crd_installed(indexes: Mapping[str, Any], kube: Kube, crd: str) -> bool:
    """From the CRD index; without it (not yet captured) one cached lookup (kube.crd_exists)."""
    index = indexes.get("moefleet_crds")
    if index is None:
        return kube.crd_exists(crd, SETTINGS.crd_cache_seconds)
    return any(index.get(crd, ()))


@kopf.index(L.GROUP, L.VERSION, L.PLURAL)
def moefleet_moedeployments(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    """Latest body of every MoEDeployment, so a pod failure can reconcile its owner at once."""
    return {(namespace, name): copy.deepcopy(dict(body))}


@kopf.on.event("", "v1", "pods", labels={**_OWNED, L.COMPONENT: L.COMPONENT_ENGINE})
def on_pod_event(body: kopf.Body, namespace: str | None, labels: Mapping[str, str], **kwargs: Any) -> None:
    """Remember a pod failure (the StatefulSet controller replaces a Failed pod within moments) and
    reconcile the owning MoEDeployment right away instead of at its next resync."""
    pod = pod_state(body)
    if not pod_failed(pod) or not leading():
        return
    key = (namespace or "", pod.group)
    known = STATE.failures.get(key)
    if known is not None and known.uid == pod.uid and known.message == pod.failure:
        return
    message = pod.failure or f"restarted {pod.restart_count} time(s)"
    STATE.failures[key] = Failure(pod=pod.name, uid=pod.uid, message=message, seen_at=time.time())
    for owner in kwargs["moefleet_moedeployments"].get((namespace, labels.get(L.DEPLOYMENT, "")), []):
        if not owner.get("metadata", {}).get("deletionTimestamp"):
            reconcile(owner, kwargs)


# -- reconcile ---------------------------------------------------------------------------------------------
@kopf.on.event(L.GROUP, L.VERSION, L.PLURAL)
def on_event(event: Mapping[str, Any], body: kopf.Body, **kwargs: Any) -> None:
    STATE.indexes = kwargs  # kopf's index objects live as long as the operator: the resync loop uses them
    if event.get("type") == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        metadata = body.get("metadata", {})
        fleet_metrics.COLLECTOR.forget(metadata.get("namespace", ""), metadata.get("name", ""))
        return
    reconcile(body, kwargs)


# -- the resync loop (instead of kopf timers, which would finalize every object) ---------------------------
async def _resync_loop() -> None:
    """Every resync period (and at once when this replica becomes the leader): reconcile every
    MoEDeployment from the index in a thread pool, and keep one EPLB and one autoscaling task per
    MoEDeployment."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(SETTINGS.workers, thread_name_prefix="moefleet-resync")
    last = time.monotonic()
    was_leading = False
    try:
        while not STATE.closing:
            await asyncio.sleep(min(SETTINGS.resync_seconds, 0.5))
            now_leading = leading()
            due = time.monotonic() - last >= SETTINGS.resync_seconds or (now_leading and not was_leading)
            was_leading = now_leading
            if not now_leading:
                _stop_tasks(STATE.eplb_tasks, set())
                _stop_tasks(STATE.autoscale_tasks, set())
                continue
            indexes = STATE.indexes
            if not due or indexes is None:
                continue
            last = time.monotonic()
            bodies = [b for store in indexes["moefleet_moedeployments"].values() for b in store]
            live = [b for b in bodies if not b.get("metadata", {}).get("deletionTimestamp")]
            await asyncio.gather(*(loop.run_in_executor(executor, _resync_one, b, indexes) for b in live))
            _sync_eplb_tasks(live)
            _sync_tasks(STATE.autoscale_tasks, live, _autoscale_task)  # costs nothing without autoscaling
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _resync_one(body: Mapping[str, Any], indexes: Mapping[str, Any]) -> None:
    try:
        reconcile(body, indexes)
    except kopf.TemporaryError as error:
        meta = body.get("metadata", {})
        log.warning(
            "%s/%s: reconcile failed, retried later: %s", meta.get("namespace"), meta.get("name"), error
        )
    except Exception:  # a bug: log it with its traceback, keep the loop (and the other objects) going
        if STATE.closing:  # the client was closed under a reconcile in flight: stopping, not a failure
            log.info(
                "reconcile of %s stopped: the operator is shutting down", body.get("metadata", {}).get("name")
            )
            return
        log.exception("reconcile of %s failed", body.get("metadata", {}).get("name"))


def _create_failures(
    namespace: str, children: Mapping[tuple[str, str], ChildState], pods: Mapping[str, list[Any]], kube: Kube
) -> dict[str, str]:
    """group -> the StatefulSet controller's FailedCreate message, looked up (one cached LIST of Events)
    only for a StatefulSet whose controller has seen its spec but created fewer pods than it wants."""
    out: dict[str, str] = {}
    ttl = max(SETTINGS.resync_seconds, 5.0)
    for (kind, name), child in children.items():
        if kind != "StatefulSet" or child.live is None:
            continue
        short = child.observed_generation >= child.generation and child.status_replicas < child.replicas
        if not short or len(pods.get(name, [])) >= child.replicas:
            continue
        key = (namespace, name)
        cached = STATE.create_checks.get(key)
        if cached is None or time.monotonic() - cached[0] > ttl:
            try:
                cached = (time.monotonic(), kube.failed_create(namespace, name))
            except (KubeError, httpx.HTTPError) as error:
                log.warning("%s/%s: cannot read FailedCreate events: %s", namespace, name, error)
                cached = (time.monotonic(), None)
            STATE.create_checks[key] = cached
        if cached[1]:
            out[name] = cached[1]
    return out


def _observed(namespace: str, name: str, indexes: Mapping[str, Any], kube: Kube, podmonitors: bool) -> Any:
    key = (namespace, name)
    children: dict[tuple[str, str], ChildState] = {}
    for _, _, index_id in _CHILD_INDEXES:
        for child in indexes[index_id].get(key, []):
            children[(child.kind, child.name)] = child
    now = time.monotonic()
    applied = STATE.applied.setdefault(key, {})
    passed = STATE.watch_passed.setdefault(key, {})
    for child_key, (spec_hash, version, when) in list(applied.items()):
        seen = children.get(child_key)
        caught_up = seen is not None and seen.spec_hash == spec_hash and seen.resource_version >= version
        # a watched kind whose watch has delivered nothing yet (a busy operator's first minutes) is at 0
        progress = _WATCH_PROGRESS.get(child_key[0], 0) if child_key[0] in _CHILD_KINDS else None
        if progress is not None and 0 < version <= progress:
            passed.setdefault(child_key, now)  # when the watch was first seen past our write
        since = passed.get(child_key)
        if applied_memo_expired(
            caught_up, version, progress, now - when, None if since is None else now - since
        ):
            del applied[child_key]  # the watch caught up (or got past our write, or the entry is too old)
            passed.pop(child_key, None)
        else:  # what we applied, content unknown (no drift check, no revision) until the watch shows it
            ready, replicas = (seen.ready_replicas, seen.replicas) if seen is not None else (0, 0)
            children[child_key] = ChildState(child_key[0], child_key[1], spec_hash, ready, replicas)
    if podmonitors:
        monitor = kube.get("PodMonitor", namespace, name)
        if monitor is not None:
            children[("PodMonitor", name)] = child_state({**monitor, "kind": "PodMonitor"})
    pods: dict[str, list[Any]] = {}
    for pod in indexes["moefleet_pods"].get(key, []):
        pods.setdefault(pod.group, []).append(pod)
    failures = {group: f for (ns, group), f in STATE.failures.items() if ns == namespace}
    nodes = indexes.get("moefleet_nodes")
    return planner.Observed(
        children=children,
        pods=pods,
        failures=failures,
        node_ready=_NodeReady(nodes) if nodes is not None else None,
        create_failures=_create_failures(namespace, children, pods, kube),
    )


def _previous_status(namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The body's status, unless our own newer write has not come back through the watch yet."""
    status = dict(body.get("status") or {})
    written = STATE.written_status.get((namespace, name))
    resource_version = int(body.get("metadata", {}).get("resourceVersion") or 0)
    if written and resource_version < written[0]:
        return written[1]
    return status


def reconcile(body: Mapping[str, Any], indexes: Mapping[str, Any]) -> None:
    """One level-triggered pass for one MoEDeployment (serialised per object)."""
    if STATE.closing or not leading():
        return
    metadata = body.get("metadata", {})
    backoff = STATE.apply_backoff.get((metadata.get("namespace", ""), metadata.get("name", "")))
    if (
        backoff is not None
        and time.monotonic() < backoff[1]
        and int(metadata.get("generation") or 0) == backoff[2]
    ):
        return  # the last apply failed: wait for the backoff (a spec change retries at once)
    try:
        _reconcile(body, indexes)
    except RuntimeError as error:  # httpx: "the client has been closed" while the operator stops
        if not STATE.closing:
            raise
        log.info("reconcile stopped: the operator is shutting down (%s)", error)


def _reconcile(body: Mapping[str, Any], indexes: Mapping[str, Any]) -> None:
    metadata = body.get("metadata", {})
    namespace, name = metadata["namespace"], metadata["name"]
    ref = {"namespace": namespace, "name": name, "uid": metadata.get("uid", "")}
    kube = STATE.client()
    with STATE.lock((namespace, name)):
        now = time.time()
        previous = _previous_status(namespace, name, body)
        fleet_metrics.COLLECTOR.observe(namespace, name, previous)
        try:
            spec = parse(body, default_image=SETTINGS.default_image)
            security.check_model_volume(spec, SETTINGS.allow_host_path)
        except SpecError as error:
            generation = int(metadata.get("generation") or 0)
            status = invalid_spec_status(previous, error.field, str(error), generation, now)
            if status != previous:
                events = condition_events(previous, status)
                response, _ = kube.execute(ref, planner.Plan(status=status), True, events)
                _remember_status(namespace, name, response, status)
            return
        try:  # the engines' admin token (EPLB trigger), before any engine pod refers to it
            eplb_loop.ensure_admin_secret(kube, spec, render.owner_reference(spec))
        except (KubeError, httpx.HTTPError) as error:
            raise kopf.TemporaryError(
                f"admin Secret: {error}", delay=min(SETTINGS.resync_seconds, 10)
            ) from error
        # The PodMonitor is managed (created, or deleted when turned off) only where its CRD exists.
        podmonitors = _crd_installed(indexes, kube, L.PODMONITOR_CRD)
        # Gang placement (gang.py): the scheduler whose CRDs exist; its PodGroups go before the pods.
        installed = {b.crd for b in gang.BACKENDS if _crd_installed(indexes, kube, b.crd)}
        backend = gang.choose_backend(spec, installed)
        try:
            gang_sync.sync_pod_groups(kube, namespace, name, backend, render.render_pod_groups(spec, backend))
        except KubeError as error:
            raise kopf.TemporaryError(
                f"PodGroups: {error}", delay=min(SETTINGS.resync_seconds, 10)
            ) from error
        desired = render.render_all(
            spec, podmonitors, backend, SETTINGS.namespace, SETTINGS.metrics_namespace
        )
        observed = _observed(namespace, name, indexes, kube, podmonitors)
        managed = (*_CHILD_KINDS, "PodMonitor") if podmonitors else _CHILD_KINDS
        the_plan = planner.plan(
            spec,
            desired,
            observed,
            previous,
            now,
            managed_kinds=managed,
            force_delete_after=SETTINGS.force_delete_after_seconds,
        )
        the_plan.pod_gates = _unwritten_gates(namespace, name, the_plan.pod_gates, observed)
        the_plan.status["placement"] = gang.placement_status(spec, backend)
        last_write = STATE.status_written_at.get((namespace, name))
        write_status = write_due(
            previous,
            the_plan.status,
            other_writes=the_plan.writes > 0,
            seconds_since_last_write=None if last_write is None else time.monotonic() - last_write,
            batch_seconds=SETTINGS.status_batch_seconds,
        )
        events = the_plan.events + (condition_events(previous, the_plan.status) if write_status else [])
        if not the_plan.writes and not write_status:
            return
        log.info(
            "%s/%s: %d write(s), status %s",
            namespace,
            name,
            the_plan.writes,
            "changed" if write_status else "same",
        )
        if not leading():  # lost the Lease while planning: the new leader acts
            return
        try:
            response, versions = kube.execute(ref, the_plan, write_status, events)
        except KubeError as error:
            _apply_failed(ref, spec.generation, the_plan.status, previous, error, now)
            return
        STATE.apply_backoff.pop((namespace, name), None)
        applied = STATE.applied.setdefault((namespace, name), {})
        for obj in the_plan.apply:
            key = (obj["kind"], obj["metadata"]["name"])
            spec_hash = obj["metadata"]["annotations"][L.SPEC_HASH]
            applied[key] = (spec_hash, versions.get(key, 0), time.monotonic())
            STATE.watch_passed.setdefault((namespace, name), {}).pop(key, None)
        if write_status:
            _remember_status(namespace, name, response, the_plan.status)
        gates = STATE.gates.setdefault((namespace, name), {})
        uids = {pod.name: pod.uid for group_pods in observed.pods.values() for pod in group_pods}
        for pod_name, ready in the_plan.pod_gates:
            gates[(pod_name, uids.get(pod_name, ""))] = (ready, time.monotonic())
        for group in the_plan.delete_pods:
            STATE.failures.pop((namespace, group), None)


def _apply_failed(
    ref: Mapping[str, str],
    generation: int,
    planned: dict[str, Any],
    previous: dict[str, Any],
    error: KubeError,
    now: float,
) -> None:
    """The API server refused a write (quota, admission, ...): report it as Degraded ApplyFailed with the
    server's message and retry with exponential backoff (a spec change retries at once)."""
    key = (ref["namespace"], ref["name"])
    failures = (STATE.apply_backoff.get(key) or (0, 0.0, 0))[0] + 1
    delay = min(SETTINGS.apply_backoff_base_seconds * 2 ** (failures - 1), SETTINGS.apply_backoff_max_seconds)
    STATE.apply_backoff[key] = (failures, time.monotonic() + delay, generation)
    log.warning("%s/%s: apply failed (attempt %d, retry in %gs): %s", *key, failures, delay, error)
    message = f"{error} (attempt {failures}; retrying with backoff)"
    status = with_degraded(planned, previous, "ApplyFailed", message, now)
    status["conditions"] = [  # what was applied is unknown: keep Available/Ready as they were
        next((c for c in previous.get("conditions") or [] if c.get("type") == t), c)
        if t in ("Available", "Ready")
        else c
        for c in status["conditions"]
        for t in [c.get("type")]
    ]
    if status == previous:
        return
    kube = STATE.client()
    try:
        response = kube.replace_status(key[0], key[1], status)
    except (KubeError, httpx.HTTPError) as status_error:
        log.warning("%s/%s: could not report the apply failure: %s", *key, status_error)
        return
    _remember_status(key[0], key[1], response, status)
    for event in condition_events(previous, status):
        kube.create_event(ref, event)


def _unwritten_gates(
    namespace: str, name: str, pod_gates: list[tuple[str, bool]], observed: planner.Observed
) -> list[tuple[str, bool]]:
    """Drop gate writes this operator made moments ago that the pod watch does not show yet (the same pod,
    by uid, and value, within _APPLIED_TTL): a reconcile triggered by another event must not repeat them."""
    gates = STATE.gates.setdefault((namespace, name), {})
    now = time.monotonic()
    for key, (_, when) in list(gates.items()):
        if now - when > _APPLIED_TTL:
            del gates[key]
    uids = {pod.name: pod.uid for group_pods in observed.pods.values() for pod in group_pods}
    return [
        (pod, ready)
        for pod, ready in pod_gates
        if (gates.get((pod, uids.get(pod, ""))) or (None, 0.0))[0] is not ready
    ]


def _remember_status(namespace: str, name: str, response: Any, status: dict[str, Any]) -> None:
    resource_version = int(((response or {}).get("metadata") or {}).get("resourceVersion") or 0)
    STATE.written_status[(namespace, name)] = (resource_version, status)
    STATE.status_written_at[(namespace, name)] = time.monotonic()  # status batching (status.write_due)
    fleet_metrics.COLLECTOR.observe(namespace, name, status)


# -- EPLB trigger: one task per MoEDeployment, kept by the resync loop (eplb_loop.py does the work) ---------
def _sync_tasks(
    tasks: dict[tuple[str, str], asyncio.Task[None]],
    bodies: list[Mapping[str, Any]],
    make: Callable[[tuple[str, str]], Coroutine[Any, Any, None]],
) -> None:
    """Keep one task per live MoEDeployment in `tasks` (started by `make(key)`, restarted when done), and
    cancel those of deployments that are gone."""
    wanted = set()
    for body in bodies:
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        wanted.add(key)
        task = tasks.get(key)
        if task is None or task.done():
            tasks[key] = asyncio.get_running_loop().create_task(make(key))
    _stop_tasks(tasks, wanted)


def _stop_tasks(tasks: dict[tuple[str, str], asyncio.Task[None]], keep: set[tuple[str, str]]) -> None:
    for key in [k for k in tasks if k not in keep]:
        tasks.pop(key).cancel()


def _sync_eplb_tasks(bodies: list[Mapping[str, Any]]) -> None:
    """One EPLB task per live MoEDeployment while a Prometheus is configured (and this replica leads)."""
    if SETTINGS.prometheus_url:
        _sync_tasks(STATE.eplb_tasks, bodies, _eplb_task)


def _latest_body(key: tuple[str, str]) -> Mapping[str, Any] | None:
    store = (STATE.indexes or {}).get("moefleet_moedeployments", {}).get(key)
    return next(iter(store), None) if store else None


async def _eplb_task(key: tuple[str, str]) -> None:
    """Every spec.eplb.interval: read Prometheus, maybe rebalance one group per role, report. Each pass runs
    in a thread of its own (the HTTP calls block); the latest body is read from the index every time."""
    with httpx.Client(timeout=SETTINGS.prometheus_timeout_seconds) as prometheus:
        while not STATE.closing and leading():
            body = _latest_body(key)
            if body is None or body.get("metadata", {}).get("deletionTimestamp"):
                return
            interval = await asyncio.to_thread(_eplb_pass, body, prometheus)
            await asyncio.sleep(interval)


def _eplb_pass(body: Mapping[str, Any], prometheus: httpx.Client) -> float:
    """One EPLB trigger cycle for one MoEDeployment; returns the seconds until the next."""
    metadata = body.get("metadata", {})
    namespace, name = metadata["namespace"], metadata["name"]
    try:
        spec = parse(body, default_image=SETTINGS.default_image)
        security.check_model_volume(spec, SETTINGS.allow_host_path)
    except SpecError:
        return 30.0  # the reconcile reports it
    if not spec.eplb.enabled or spec.eplb.mode == "off":
        return spec.eplb.interval_seconds
    ref = {"namespace": namespace, "name": name, "uid": metadata.get("uid", "")}
    try:
        eplb_loop.cycle(
            spec,
            ref,
            _previous_status(namespace, name, body),
            STATE.client(),
            lambda mutate: _write_status(body, mutate),
            prometheus,
            SETTINGS.prometheus_url,
            SETTINGS.engine_url_template,
            SETTINGS.admin_timeout_seconds,
        )
    except (KubeError, httpx.HTTPError) as error:
        log.warning("%s/%s: EPLB cycle failed (retried later): %s", namespace, name, error)
    except RuntimeError as error:  # httpx: "the client has been closed" while the operator stops
        if not STATE.closing:
            raise
        log.info("EPLB trigger stopped: the operator is shutting down (%s)", error)
    return spec.eplb.interval_seconds


def _write_status(body: Mapping[str, Any], mutate: Any) -> None:
    """Read-modify-write of the status under the object's lock (the reconcile holds the same lock and keeps
    what we wrote: it carries status.eplb and EPLBReady over), so neither loop loses the other's update."""
    metadata = body.get("metadata", {})
    namespace, name = metadata["namespace"], metadata["name"]
    with STATE.lock((namespace, name)):
        previous = _previous_status(namespace, name, body)
        status = mutate(copy.deepcopy(previous))
        if status == previous:
            return
        response = STATE.client().replace_status(namespace, name, status)
        _remember_status(namespace, name, response, status)


# -- Role autoscaling: one task per MoEDeployment, kept by the resync loop (autoscale_loop.py does the work) --
async def _autoscale_task(key: tuple[str, str]) -> None:
    """Every MOEFLEET_OPERATOR_AUTOSCALE_INTERVAL_SECONDS: scale autoscaled roles in whole groups. Like the EPLB
    task: no kopf daemon (daemons finalize every object), each pass in a thread, the latest body each time."""
    with httpx.Client(timeout=SETTINGS.prometheus_timeout_seconds) as client:
        while not STATE.closing and leading():
            body = _latest_body(key)
            if body is None or body.get("metadata", {}).get("deletionTimestamp"):
                return
            await asyncio.to_thread(_autoscale_pass, body, client)
            await asyncio.sleep(SETTINGS.autoscale_interval_seconds)


def _autoscale_pass(live: Mapping[str, Any], client: httpx.Client) -> None:
    metadata = live.get("metadata", {})
    namespace, name = metadata["namespace"], metadata["name"]
    try:
        spec = parse(live, default_image=SETTINGS.default_image)
        if not autoscale_loop.wants_cycle(spec, live):
            return
        kube = STATE.client()
        # A fresh read: the decision must see the replicas, annotation and status its last pass wrote.
        body = kube.get(L.KIND, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        spec = parse(body, default_image=SETTINGS.default_image)
        context = autoscale_loop.Context(
            kube=kube,
            write_status=lambda mutate: _write_status(body, mutate),
            prometheus=client,
            prometheus_url=SETTINGS.prometheus_url,
            engine_template=SETTINGS.engine_url_template,
            drain_grace_seconds=SETTINGS.drain_grace_seconds,
            drain_timeout_seconds=SETTINGS.drain_timeout_seconds,
            fault_exit_after=SETTINGS.fault_exit_after,
        )
        autoscale_loop.cycle(spec, body, context)
    except SpecError:
        return  # the reconcile reports it
    except (KubeError, httpx.HTTPError) as error:
        log.warning("%s/%s: autoscaling cycle failed (retried later): %s", namespace, name, error)
    except RuntimeError as error:  # httpx: "the client has been closed" while the operator stops
        if not STATE.closing:
            raise
        log.info("autoscaling stopped: the operator is shutting down (%s)", error)
