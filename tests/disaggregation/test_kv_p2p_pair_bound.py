"""The `p2p` backend's bounded pair caches: the pure eviction choice (`pairs_to_drop`) against hand-computed
answers, the setting, and real gloo pair groups between pools in one process: with a bound of 1 every
transfer lands while no cache ever holds more than one pair, idle pairs are dropped and rebuilt, a pair
carrying a transfer is never evicted, and a sender that ignores the receiver's `"pair"` field (an older one)
fails once on a dropped pair, then works.

Oracle: the destination blocks equal the source blocks read by plain tensor indexing; every dropped pair's
group is aborted (recorded around `p2p._abort`).
"""

from __future__ import annotations

import threading
import time

import pytest
from disaggregation.kv_pools import expect, moved, pools, send_concurrently
from moefleet.engine.disaggregation import p2p
from moefleet.engine.disaggregation.base import TransferError
from moefleet.engine.disaggregation.p2p import P2PSender, max_pairs_setting, pairs_to_drop
from moefleet.engine.disaggregation.receiver import KVServer

pytestmark = pytest.mark.timeout(120)


# ---- the pure choice and the setting --------------------------------------------------------------------


def test_pairs_to_drop_takes_idle_ones_then_the_least_recently_used_never_a_busy_one():
    # key -> (last used, busy); now = 100, idle after 50 s.
    pairs = {"a": (10.0, False), "b": (90.0, False), "c": (60.0, False), "d": (5.0, True)}
    # "a" idle for 90 s; "d" older but busy; within the bound of 4 nothing else goes.
    assert pairs_to_drop(pairs, 100.0, 4, 50.0) == ["a"]
    # A new pair with a bound of 4: "a" (idle) makes the room.
    assert pairs_to_drop(pairs, 100.0, 4, 50.0, adding=1) == ["a"]
    # Bound 3 plus one new: "a", then the least recently used idle one, "c" (used at 60, "b" at 90).
    assert pairs_to_drop(pairs, 100.0, 3, 50.0, adding=1) == ["a", "c"]
    # Bound 2 plus one new: every idle pair goes, the busy one stays (the bound is exceeded meanwhile).
    assert pairs_to_drop(pairs, 100.0, 2, 50.0, adding=1) == ["a", "c", "b"]
    assert pairs_to_drop(pairs, 100.0, 1, 50.0, adding=1) == ["a", "c", "b"]
    # All busy: nothing, whatever the bound.
    assert pairs_to_drop({"x": (0.0, True), "y": (1.0, True)}, 100.0, 1, 50.0, adding=1) == []
    assert pairs_to_drop({}, 100.0, 1, 50.0, adding=1) == []
    # Exactly at the idle limit is not idle yet.
    assert pairs_to_drop({"z": (50.0, False)}, 100.0, 8, 50.0) == []


def test_the_bound_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(p2p.MAX_PAIRS_ENV, raising=False)
    assert max_pairs_setting() == 16
    assert max_pairs_setting(3) == 3
    monkeypatch.setenv(p2p.MAX_PAIRS_ENV, "2")
    assert max_pairs_setting() == 2 and max_pairs_setting(5) == 5
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv(p2p.MAX_PAIRS_ENV, bad)
        with pytest.raises(ValueError, match="MOEFLEET_KV_P2P_MAX_PAIRS"):
            max_pairs_setting()
    # `moefleet serve` refuses it at start-up (the decode side builds its receiver's path lazily).
    from moefleet.engine.cli import CommandError, build_parser
    from moefleet.engine.entrypoints.serve_command import check_args

    (tmp_path / "config.json").write_text("{}")
    args = build_parser().parse_args(["serve", "--model", str(tmp_path)])
    with pytest.raises(CommandError, match="MOEFLEET_KV_P2P_MAX_PAIRS='many'"):
        check_args(args)
    monkeypatch.setenv(p2p.MAX_PAIRS_ENV, "4")
    check_args(args)
    assert P2PSender(pools()[0]).max_pairs == 4


# ---- real pair groups -----------------------------------------------------------------------------------


@pytest.fixture
def aborted(monkeypatch):
    """Groups aborted by p2p (the call itself must succeed on gloo)."""
    groups: list = []
    errors: list[BaseException] = []

    def record(group):
        groups.append(group)
        try:
            group.abort()
        except Exception as exc:
            errors.append(exc)

    monkeypatch.setattr(p2p, "_abort", record)
    yield groups
    assert not errors, errors


def _pairs_of(receiver: KVServer) -> dict:
    path = receiver._paths.get("p2p")
    return {} if path is None else path._pairs  # type: ignore[attr-defined]


def test_a_bound_of_one_keeps_one_pair_per_side_and_every_transfer_lands(monkeypatch, receiver_of, aborted):
    monkeypatch.setenv(p2p.MAX_PAIRS_ENV, "1")
    src, dst = pools(num_blocks=12)
    _, dst2 = pools(num_blocks=12)
    one, two = receiver_of(dst), receiver_of(dst2)
    s1, s2 = P2PSender(src, chunk_bytes=200), P2PSender(src, chunk_bytes=1 << 20)
    # Two senders alternating into one receiver, and s1 alternating between two receiver_of.
    plan = [(s1, one), (s2, one), (s1, one), (s1, two), (s2, one), (s1, one), (s2, two), (s1, two)]
    keys = []
    try:
        for i, (sender, receiver) in enumerate(plan):
            s, d = i, i
            results, done = expect(receiver, f"b{i}", [d], num_tokens=3)
            sender.send(receiver.address, f"b{i}", [s], 3, first_token=100 + i)
            assert done.wait(5) and results[0].first_token == 100 + i and results[0].error is None
            assert moved(src, receiver.pool, [(s, d)]), i
            assert len(_pairs_of(one)) <= 1 and len(_pairs_of(two)) <= 1, i
            assert len(s1._pairs) <= 1 and len(s2._pairs) <= 1, i
            keys.append(sender._pairs[receiver.address].key)
        # No step repeats the last one of its sender and of its receiver: each built a new generation.
        assert len(set(keys)) == len(keys)
        # Both halves of every pair were aborted but the one pair each of the 4 caches still holds.
        assert len(aborted) == 2 * len(keys) - 4
    finally:
        s1.close()
        s2.close()


def test_concurrent_first_transfers_of_one_sender_build_one_pair(receiver_of, aborted):
    # Each ok reply says "no pair for you" ("") before the first transfer builds one: the later ones must
    # use that pair, not rebuild (the reply predates it).
    src, dst = pools(num_blocks=8)
    receiver = receiver_of(dst)
    sender = P2PSender(src, chunk_bytes=200)
    expected = [expect(receiver, f"c{i}", [4 + i], num_tokens=3) for i in range(4)]
    try:
        send_concurrently([(sender, receiver.address, f"c{i}", [i], 3, 10 + i) for i in range(4)])
        assert [(done.wait(5), results[0].first_token) for results, done in expected] == [
            (True, 10 + i) for i in range(4)
        ]
        assert moved(src, dst, [(i, 4 + i) for i in range(4)])
        assert sender._pairs[receiver.address].key == f"{sender.sender_id}/0" and not aborted
    finally:
        sender.close()


def test_a_pair_idle_too_long_is_dropped_on_both_sides_and_rebuilt(monkeypatch, receiver_of, aborted):
    monkeypatch.setattr(p2p, "PAIR_IDLE_SECONDS", 0.3)
    src, dst = pools()
    receiver = receiver_of(dst)
    sender = P2PSender(src)
    try:
        results, done = expect(receiver, "i1", [2], num_tokens=3)
        sender.send(receiver.address, "i1", [0], 3, first_token=1)
        assert done.wait(5) and results[0].error is None
        first = sender._pairs[receiver.address]
        assert _pairs_of(receiver)[sender.sender_id].key == first.key
        deadline = time.monotonic() + 5
        while (sender._pairs or _pairs_of(receiver)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sender._pairs and not _pairs_of(receiver)  # the sweep dropped both halves
        assert {id(first.group)} <= {id(g) for g in aborted} and len(aborted) == 2
        results, done = expect(receiver, "i2", [3], num_tokens=3)
        sender.send(receiver.address, "i2", [1], 3, first_token=2)
        assert done.wait(5) and results[0].first_token == 2
        assert sender._pairs[receiver.address].key != first.key  # a new generation
        assert moved(src, dst, [(0, 2), (1, 3)])
    finally:
        sender.close()


def test_an_eviction_never_hits_a_pair_carrying_a_transfer(monkeypatch, receiver_of, aborted):
    monkeypatch.setenv(p2p.MAX_PAIRS_ENV, "1")
    src, dst = pools()
    receiver = receiver_of(dst)
    slow_src, _ = pools()
    gather = slow_src.gather_blocks

    def slow_gather(*args):
        time.sleep(0.1)
        return gather(*args)

    slow_src.gather_blocks = slow_gather  # type: ignore[method-assign]
    slow, fast = P2PSender(slow_src, chunk_bytes=100), P2PSender(src)
    try:
        # Warm both pairs up, so the slow one's pair is the least recently used when the fast one comes.
        for i, sender in enumerate([slow, fast]):
            results, done = expect(receiver, f"w{i}", [i], num_tokens=3)
            sender.send(receiver.address, f"w{i}", [i], 3, first_token=0)
            assert done.wait(5) and results[0].error is None
        slow_results, slow_done = expect(receiver, "slow", [2, 3], num_tokens=8)
        failure: list[BaseException] = []

        def send_slow() -> None:
            try:
                slow.send(receiver.address, "slow", [4, 5], 8, first_token=7)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=send_slow)
        thread.start()
        time.sleep(0.3)  # 6 chunks 0.1 s apart: under way
        slow_pair = _pairs_of(receiver)[slow.sender_id]
        assert slow_pair.busy == 1
        results, done = expect(receiver, "fast", [4], num_tokens=3)
        fast.send(receiver.address, "fast", [0], 3, first_token=8)
        assert done.wait(5) and results[0].first_token == 8
        # The slow pair stayed (busy: the bound was exceeded meanwhile); the fast one, idle once its transfer
        # ended, was the one trimmed back to the bound.
        assert slow_pair.group not in aborted and list(_pairs_of(receiver)) == [slow.sender_id]
        thread.join(30)
        assert not failure and slow_done.wait(5) and slow_results[0].first_token == 7
        assert moved(slow_src, dst, [(4, 2), (5, 3)]) and moved(src, dst, [(0, 4)])
        assert _pairs_of(receiver) == {slow.sender_id: slow_pair} and slow_pair.busy == 0
    finally:
        slow.close()
        fast.close()


def test_a_sender_that_ignores_the_pair_field_fails_once_on_a_dropped_pair_then_works(
    monkeypatch, receiver_of, aborted
):
    monkeypatch.setenv(p2p.MAX_PAIRS_ENV, "1")
    src, dst = pools()
    receiver = receiver_of(dst)
    opened = p2p.open_transfer

    def as_older_sender(address, header):  # what a sender from before the bound reads of the ok reply
        sock, reply = opened(address, header)
        reply.pop("pair", None)
        return sock, reply

    old, other = P2PSender(src, max_pairs=8), P2PSender(src)
    monkeypatch.setattr(p2p, "open_transfer", as_older_sender)
    try:
        for i, sender in enumerate([old, other]):  # the second evicts the first on the receiver
            results, done = expect(receiver, f"o{i}", [i], num_tokens=3)
            sender.send(receiver.address, f"o{i}", [i], 3, first_token=0)
            assert done.wait(5) and results[0].error is None
        assert list(_pairs_of(receiver)) == [other.sender_id]
        results, done = expect(receiver, "o2", [2], num_tokens=3)
        with pytest.raises(TransferError, match="no pair group"):
            old.send(receiver.address, "o2", [2], 3, first_token=0)
        assert done.wait(5) and results[0].error
        results, done = expect(receiver, "o3", [3], num_tokens=3)
        old.send(receiver.address, "o3", [3], 3, first_token=5)
        assert done.wait(5) and results[0].first_token == 5 and moved(src, dst, [(3, 3)])
    finally:
        old.close()
        other.close()
