"""Leader election on a coordination.k8s.io/v1 Lease, so several operator replicas run and only one acts.

Kopf's peering is not leader election (it pauses handlers of lower-priority peers, on a best-effort basis,
and needs its own CRDs), and the kubernetes client's `leaderelection` package compares the lease's
renewTime with the local wall clock (clock skew between nodes decides who leads) and blocks its caller.
This is the client-go algorithm, small:

- The lease records `holderIdentity`, `leaseDurationSeconds`, `acquireTime`, `renewTime`,
  `leaseTransitions`. Every write is a PUT carrying the resourceVersion that was read, so two candidates
  racing for the same lease cannot both win (the loser gets HTTP 409).
- A candidate takes a lease held by someone else only after it has watched the lease record stay unchanged
  for `lease_duration` on *its own* monotonic clock (no comparison of clocks of different machines).
- The leader renews every `retry_period`. It counts as leader only while its last successful renewal is
  younger than `renew_deadline` (< lease_duration): a leader that cannot reach the API server stops acting
  before anyone else may take over, so two replicas never act at once.
- On a clean stop the leader releases the lease (empty holder), so a rolling update hands over at once.

`Elector.run` is a loop for a thread of its own; `Elector.is_leader()` is what the handlers check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    lease_duration: float = 15.0  # how long a lease record must stay unchanged before others take it
    renew_deadline: float = 10.0  # a leader that has not renewed for this long stops acting
    retry_period: float = 2.0  # between attempts to acquire or renew

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry_period < renew_deadline < lease_duration, got "
                f"{self.retry_period:g} / {self.renew_deadline:g} / {self.lease_duration:g}"
            )


def _micro_time(epoch: float) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    """One candidate. `request(verb, path, body)` -> decoded JSON or None (404); raises on other errors,
    with an int `status` attribute on the exception for HTTP errors (kube.KubeError has one)."""

    def __init__(
        self,
        request: Callable[[str, str, Any], Any],
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming = LeaseTiming(),
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._request = request
        self.namespace, self.name, self.identity, self.timing = namespace, name, identity, timing
        self._on_change = on_change
        self._clock, self._wall = clock, wall
        self._renewed_at: float | None = None  # monotonic time of our last successful acquire/renew
        self._observed: tuple[Any, ...] | None = None  # the other holder's record as last seen
        self._observed_at = 0.0
        self._leading = False
        self._stop = threading.Event()

    # -- what the operator asks -----------------------------------------------------------------------
    def is_leader(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and self._clock() - renewed < self.timing.renew_deadline

    def stop(self) -> None:
        self._stop.set()

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        """Try to acquire, then keep renewing, until stop(). The caller then joins this thread and calls
        release() (so the release never races a renewal, nor the API client being closed)."""
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception as error:  # noqa: BLE001 - any failure is "not renewed"; logged, retried
                log.warning("leader election: %s", error)
            self._notify()
            self._stop.wait(self.timing.retry_period)

    def _notify(self) -> None:
        leading = self.is_leader()
        if leading != self._leading:
            self._leading = leading
            log.info("leader election: %s %s", self.identity, "leads" if leading else "does not lead")
            if self._on_change is not None:
                self._on_change(leading)

    def _path(self, name: str | None = None) -> str:
        path = LEASE_PATH.format(namespace=self.namespace)
        return f"{path}/{name}" if name else path

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the lease afterwards."""
        now_wall = self._wall()
        lease = self._request("GET", self._path(self.name), None)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now_wall, acquire=True, transitions=0),
            }
            return self._write("POST", self._path(), body)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder != self.identity and holder:
            record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
            if record != self._observed:  # it moved: the holder is alive; restart our own clock
                self._observed, self._observed_at = record, self._clock()
            duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
            if self._clock() - self._observed_at < duration:
                self._renewed_at = None
                return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            new_spec = {**spec, **self._spec(now_wall, acquire=False, transitions=transitions)}
        else:  # expired or released: take it
            new_spec = self._spec(now_wall, acquire=True, transitions=transitions + 1)
        body = {**lease, "spec": new_spec}  # metadata.resourceVersion makes the PUT conditional
        return self._write("PUT", self._path(self.name), body)

    def _spec(self, now_wall: float, acquire: bool, transitions: int) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(round(self.timing.lease_duration)),
            "renewTime": _micro_time(now_wall),
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = _micro_time(now_wall)
        return spec

    def _write(self, verb: str, path: str, body: dict[str, Any]) -> bool:
        started = self._clock()
        try:
            self._request(verb, path, body)
        except Exception as error:
            if getattr(error, "status", None) == 409:  # someone else wrote first: not ours this round
                self._renewed_at = None
                return False
            raise
        self._renewed_at = started  # measured from before the request: never overestimates the lease
        return True

    def release(self) -> None:
        """Give the lease up if we hold it (a clean stop): the next candidate takes over at once."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        try:
            lease = self._request("GET", self._path(self.name), None)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1}
            self._request("PUT", self._path(self.name), {**lease, "spec": spec})
            log.info("leader election: %s released the lease", self.identity)
        except Exception as error:  # noqa: BLE001 - the lease then expires on its own
            log.warning("leader election: could not release the lease: %s", error)
