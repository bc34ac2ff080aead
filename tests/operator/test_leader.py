"""leader.Elector against an in-memory Lease store that enforces resourceVersion like the API server
(optimistic concurrency: a PUT with a stale resourceVersion gets 409), with hand-driven clocks."""

from __future__ import annotations

import copy

import pytest
from moefleet.operator.leader import Elector, LeaseTiming

TIMING = LeaseTiming(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)
PATH = "/apis/coordination.k8s.io/v1/namespaces/sys/leases"


class Conflict(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class FakeApi:
    """One Lease; counts writes; `down` makes every request fail (an unreachable API server)."""

    def __init__(self) -> None:
        self.lease: dict | None = None
        self.version = 0
        self.writes: list[tuple[str, str]] = []
        self.down = False

    def request(self, verb: str, path: str, body):
        if self.down:
            raise ConnectionError("API server unreachable")
        if verb == "GET":
            assert path == f"{PATH}/lease"
            return copy.deepcopy(self.lease)
        if verb == "POST":
            assert path == PATH
            if self.lease is not None:
                raise Conflict(409)
        else:
            assert verb == "PUT" and path == f"{PATH}/lease"
            if self.lease is None or body["metadata"].get("resourceVersion") != str(self.version):
                raise Conflict(409)
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        self.writes.append((verb, body["spec"].get("holderIdentity") or ""))
        return copy.deepcopy(self.lease)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def electors(api: FakeApi, clock: Clock) -> tuple[Elector, Elector]:
    make = lambda who: Elector(api.request, "sys", "lease", who, TIMING, clock=clock, wall=clock)  # noqa: E731
    return make("a"), make("b")


def test_first_candidate_creates_the_lease_and_the_second_waits():
    api, clock = FakeApi(), Clock()
    a, b = electors(api, clock)
    assert a.try_acquire_or_renew() and a.is_leader()
    assert not b.try_acquire_or_renew() and not b.is_leader()
    for _ in range(20):  # a renews every retry period; b never takes a lease that keeps moving
        clock.t += TIMING.retry_period
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
        assert a.is_leader() and not b.is_leader()
    assert {holder for _, holder in api.writes} == {"a"}
    assert api.lease["spec"]["leaseTransitions"] == 0


def test_a_dead_leaders_lease_is_taken_only_after_the_lease_duration():
    api, clock = FakeApi(), Clock()
    a, b = electors(api, clock)
    a.try_acquire_or_renew()
    b.try_acquire_or_renew()  # b sees a's record now
    # a dies. b keeps trying: the record stays the same, so b must wait lease_duration on its own clock.
    for _ in range(7):
        clock.t += TIMING.retry_period  # up to 14 s < 15 s
        assert not b.try_acquire_or_renew()
    clock.t += TIMING.retry_period  # 16 s
    assert b.try_acquire_or_renew() and b.is_leader()
    assert api.lease["spec"]["holderIdentity"] == "b" and api.lease["spec"]["leaseTransitions"] == 1
    # a comes back (it was only paused): it sees b's record and does not lead.
    assert not a.try_acquire_or_renew() and not a.is_leader()


def test_a_leader_that_cannot_renew_stops_leading_before_anyone_else_may_take_over():
    api, clock = FakeApi(), Clock()
    a, b = electors(api, clock)
    a.try_acquire_or_renew()
    b.try_acquire_or_renew()
    api.down = True
    clock.t += TIMING.renew_deadline - 0.1
    assert a.is_leader()
    clock.t += 0.2
    assert not a.is_leader()  # at renew_deadline (10 s), well before b may take over (15 s)
    api.down = False
    clock.t += TIMING.lease_duration - TIMING.renew_deadline
    assert b.try_acquire_or_renew()
    assert not a.try_acquire_or_renew() and not a.is_leader()


def test_racing_candidates_cannot_both_win_a_released_lease():
    api, clock = FakeApi(), Clock()
    a, b = electors(api, clock)
    a.try_acquire_or_renew()
    a.release()
    assert api.lease["spec"]["holderIdentity"] is None and not a.is_leader()
    # b and a both read the released lease, then both write: the second write is stale (409).
    lease = api.request("GET", f"{PATH}/lease", None)
    original_get = api.request

    def stale_get(verb, path, body):
        return copy.deepcopy(lease) if verb == "GET" else original_get(verb, path, body)

    api.request = stale_get  # type: ignore[method-assign]
    b._request = a._request = api.request  # noqa: SLF001 - both candidates read the same old record
    won = [b.try_acquire_or_renew(), a.try_acquire_or_renew()]
    assert won == [True, False] and b.is_leader() and not a.is_leader()


def test_timing_must_be_ordered():
    with pytest.raises(ValueError, match="retry_period < renew_deadline < lease_duration"):
        LeaseTiming(lease_duration=10, renew_deadline=10, retry_period=2)
