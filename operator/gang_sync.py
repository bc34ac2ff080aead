"""Apply a MoEDeployment's PodGroups (gang.py renders them) through the Kubernetes API: the side effects.

PodGroup kinds exist only where their scheduler is installed, so they are not watched (kopf would fail on a
missing CRD): one LIST per reconcile, by the deployment's label, only while a PodGroup backend is chosen.
PodGroups are applied before the StatefulSets (a Volcano pod waits for its PodGroup) and deleted when their
group goes; they are owned by the MoEDeployment, so deleting it collects them. A deployment whose desired
PodGroups (names and hashes) are what this process converged them to less than RESYNC_SECONDS ago makes no
request at all (quiet reconciles stay quiet); a PodGroup deleted by hand comes back within RESYNC_SECONDS.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from moefleet.operator import labels as L
from moefleet.operator.gang import GangBackend
from moefleet.operator.kube import Kube

Obj = dict[str, Any]
RESYNC_SECONDS = 300.0
# (namespace, deployment) -> (backend + desired (name, hash) pairs, monotonic time they were converged)
_SYNCED: dict[tuple[str, str], tuple[frozenset[tuple[str, str]], float]] = {}
_LOCK = threading.Lock()


def _collection(backend: GangBackend, namespace: str) -> str:
    return f"/apis/{backend.api_version}/namespaces/{namespace}/{backend.plural}"


def sync_pod_groups(
    kube: Kube,
    namespace: str,
    deployment: str,
    backend: GangBackend | None,
    desired: Sequence[Mapping[str, Any]],
) -> tuple[int, int]:
    """Converge the PodGroups of `deployment` to `desired`; returns (applied, deleted)."""
    key = (namespace, deployment)
    if backend is None or not backend.api_version:
        with _LOCK:
            _SYNCED.pop(key, None)
        return 0, 0
    wanted_state = frozenset(
        [("backend", backend.name)]
        + [(o["metadata"]["name"], o["metadata"]["annotations"][L.SPEC_HASH]) for o in desired]
    )
    with _LOCK:
        synced = _SYNCED.get(key)
    if synced is not None and synced[0] == wanted_state and time.monotonic() - synced[1] < RESYNC_SECONDS:
        return 0, 0
    path = _collection(backend, namespace)
    selector = f"{L.DEPLOYMENT}={deployment},{L.MANAGED_BY}={L.MANAGED_BY_VALUE}"
    listed = kube.request("GET", path, backend.plural, params={"labelSelector": selector}) or {}
    existing = {
        item["metadata"]["name"]: (item["metadata"].get("annotations") or {}).get(L.SPEC_HASH)
        for item in listed.get("items") or []
    }
    applied = deleted = 0
    wanted = set()
    for obj in desired:
        name = obj["metadata"]["name"]
        wanted.add(name)
        if existing.get(name) == obj["metadata"]["annotations"][L.SPEC_HASH]:
            continue
        kube.request(
            "PATCH",
            f"{path}/{name}",
            backend.plural,
            body=obj,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": L.FIELD_MANAGER, "force": "true"},
        )
        applied += 1
    for name in sorted(set(existing) - wanted):
        kube.request("DELETE", f"{path}/{name}", backend.plural, missing_ok=True)
        deleted += 1
    with _LOCK:
        _SYNCED[key] = (wanted_state, time.monotonic())
    return applied, deleted
