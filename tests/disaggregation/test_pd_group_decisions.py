"""Pure decisions of PD with multi-rank groups: the gateway's DP-rank choice, per-rank loads from /metrics, the
front end's placement of a transfer on the named rank, the transfer headers, the receiver's announced address."""

from __future__ import annotations

import pytest
from moefleet.engine.disaggregation.group_roles import advertised_host
from moefleet.engine.disaggregation.roles import parse_pd_headers
from moefleet.engine.distributed.request_router import AddRequest, route_messages
from moefleet.engine.gateway.app import _refusal
from moefleet.engine.gateway.pd import decode_target
from moefleet.engine.gateway.pool import Backend, parse_rank_loads
from moefleet.engine.gateway.routing import (
    BackendView,
    NoBackendError,
    PDAttempt,
    RankView,
    next_pd_attempt,
    pd_attempt_limit,
    pick_dp_rank,
)
from moefleet.engine.gateway.upstream import Full


def test_pick_dp_rank_prefers_kv_headroom_then_fewer_requests_then_lower_rank():
    assert pick_dp_rank([RankView(0.5, 4), RankView(0.2, 9)]) == 1  # headroom wins over request count
    assert pick_dp_rank([RankView(0.3, 3), RankView(0.3, 1)]) == 1
    assert pick_dp_rank([RankView(), RankView()]) == 0
    assert pick_dp_rank([]) == 0


def test_pick_dp_rank_counts_requests_placed_since_the_last_report():
    # 0.1 KV per running request (from the reports); rank 1 got 3 requests since: 0.2 + 0.3 > 0.4.
    ranks = [RankView(0.4, 4), RankView(0.2, 2, opened=3)]
    assert pick_dp_rank(ranks) == 0
    # A burst between two polls alternates instead of piling onto one rank.
    opened = [0, 0]
    for _ in range(6):
        rank = pick_dp_rank([RankView(0.0, 0, 0, opened[0]), RankView(0.0, 0, 0, opened[1])])
        opened[rank] += 1
    assert opened == [3, 3]


METRICS = """# TYPE moefleet_dp_rank_kv_cache_usage_ratio gauge
moefleet_dp_rank_kv_cache_usage_ratio{dp_rank="0"} 0.25
moefleet_dp_rank_kv_cache_usage_ratio{dp_rank="1"} 0.5
# TYPE moefleet_dp_rank_num_requests_running gauge
moefleet_dp_rank_num_requests_running{dp_rank="0"} 2.0
moefleet_dp_rank_num_requests_running{dp_rank="1"} 3.0
# TYPE moefleet_dp_rank_num_requests_waiting_for_kv gauge
moefleet_dp_rank_num_requests_waiting_for_kv{dp_rank="1"} 4.0
# TYPE moefleet_num_requests_running gauge
moefleet_num_requests_running 5.0
"""


def test_parse_rank_loads_reads_the_per_rank_series():
    assert parse_rank_loads(METRICS) == [RankView(0.25, 2, 0), RankView(0.5, 3, 4)]
    assert parse_rank_loads("moefleet_num_requests_running 5.0\n") == []  # a single-process engine
    gap = 'moefleet_dp_rank_kv_cache_usage_ratio{dp_rank="1"} 0.5\n'
    assert parse_rank_loads(gap) == []  # ranks missing: no per-rank view rather than a wrong one


def test_decode_target_names_the_rank_receiver_as_the_gateway_reaches_it():
    backend = Backend("d0", "decode", "http://10.0.0.7:8000", ranks=[RankView(0.9, 5), RankView(0.1, 1)])
    boot = {"kv_port": 41000, "kv_ports": [41000, 41001], "kv_nodes": [0, 0], "kv_addresses": ["x", "y"]}
    assert decode_target(backend, boot) == (1, "10.0.0.7:41001")
    boot_two_nodes = {**boot, "kv_nodes": [0, 1], "kv_addresses": ["127.0.0.1:41000", "10.0.0.8:41001"]}
    assert decode_target(backend, boot_two_nodes) == (1, "10.0.0.8:41001")  # a rank on another node
    single = {"kv_port": 40000, "kv_address": "127.0.0.1:40000"}  # a single-process decode server
    assert decode_target(backend, single) == (0, "10.0.0.7:40000")


def test_route_messages_places_a_request_on_its_named_rank():
    owners: dict[str, int] = {}
    inbox = [
        AddRequest("a", None, cost=5, rank=1),
        AddRequest("b", None, cost=5),
        AddRequest("c", None, rank=7),
    ]
    per_rank = route_messages(inbox, [0, 0], owners)
    # "a" goes to rank 1 although rank 0 is less loaded; "b" then to the least-loaded rank 0; an out-of-range
    # rank falls back to the least-loaded one.
    assert owners == {"a": 1, "b": 0, "c": 0}
    assert [[m.request_id for m in msgs] for msgs in per_rank] == [["b", "c"], ["a"]]


def test_parse_pd_headers():
    assert parse_pd_headers({}) is None
    pd = parse_pd_headers({"x-moefleet-kv-transfer": "t1", "x-moefleet-dp-rank": "3"})
    assert pd is not None and (pd.transfer_id, pd.target, pd.dp_rank) == ("t1", None, 3)
    pd = parse_pd_headers(
        {"x-moefleet-kv-transfer": "t2", "x-moefleet-kv-target": "h:1", "x-moefleet-dp-rank": "x"}
    )
    assert pd is not None and (pd.target, pd.dp_rank) == ("h:1", None)


@pytest.mark.parametrize(
    ("host", "node", "env", "want"),
    [
        ("10.1.2.3", 1, {}, "10.1.2.3"),
        ("0.0.0.0", 0, {"MOEFLEET_POD_IP": "10.9.9.9"}, "127.0.0.1"),
        ("0.0.0.0", 2, {"MOEFLEET_POD_IP": "10.9.9.9"}, "10.9.9.9"),
        ("::", 1, {"POD_IP": "10.8.8.8"}, "10.8.8.8"),
    ],
)
def test_advertised_host(host, node, env, want):
    assert advertised_host(host, node, env) == want


def test_a_silent_stream_is_cut_at_once_when_its_group_is_down_but_not_while_it_is_only_slow():
    from moefleet.engine.gateway.pool import should_cut_silent_stream

    healthy = Backend("b", "mixed", "http://b:1", healthy=True)
    assert not should_cut_silent_stream(healthy, now=100.0, patience_s=30)
    down = Backend("b", "mixed", "http://b:1", healthy=False, unhealthy_since=99.0, timed_out_only=False)
    assert should_cut_silent_stream(down, now=100.0, patience_s=30)
    slow = Backend("b", "mixed", "http://b:1", healthy=False, unhealthy_since=90.0, timed_out_only=True)
    assert not should_cut_silent_stream(slow, now=100.0, patience_s=30)  # overloaded: its streams go on
    assert should_cut_silent_stream(slow, now=120.0, patience_s=30)  # silent for too long: frozen


def _groups(*specs: tuple[str, str, bool, int]) -> list[BackendView]:
    return [BackendView(name, role, eligible, running=running) for name, role, eligible, running in specs]


def test_next_pd_attempt_skips_only_the_side_that_failed():
    views = _groups(
        ("d0", "decode", True, 0),
        ("d1", "decode", True, 2),
        ("d2", "decode", False, 0),  # unhealthy: never tried
        ("p0", "prefill", True, 0),
        ("p1", "prefill", True, 1),
    )
    assert next_pd_attempt(views, "least-load") == PDAttempt("d0", "p0")
    # d0 refused (full, dead): the next decode group, the same prefill group.
    assert next_pd_attempt(views, "least-load", failed_decode=frozenset({"d0"})) == PDAttempt("d1", "p0")
    # p0 failed: the same decode group, the next prefill group.
    assert next_pd_attempt(views, "least-load", failed_prefill=frozenset({"p0"})) == PDAttempt("d0", "p1")
    # Every prefill group failed: the decode group serves the request whole.
    both = frozenset({"p0", "p1"})
    assert next_pd_attempt(views, "least-load", failed_prefill=both) == PDAttempt("d0", None)
    # No decode group left: the request fails (503), naming the groups.
    with pytest.raises(NoBackendError, match="no healthy decode group"):
        next_pd_attempt(views, "least-load", failed_decode=frozenset({"d0", "d1"}))
    # Round-robin still turns over the groups that are left.
    rr = [next_pd_attempt(views, "round-robin", failed_decode=frozenset({"d0"}), turn=t) for t in range(2)]
    assert rr == [PDAttempt("d1", "p0"), PDAttempt("d1", "p1")]


def test_pd_attempts_are_bounded_by_the_groups_and_every_attempt_grows_a_failed_set():
    views = _groups(
        ("d0", "decode", True, 0),
        ("d1", "decode", True, 0),
        ("d2", "decode", False, 0),
        ("p0", "prefill", True, 0),
        ("m0", "mixed", True, 0),
    )
    assert pd_attempt_limit(views) == 4  # d0, d1, p0, then whole on a decode group
    # Worst case, every attempt fails, alternating sides: the loop ends (whole or 503) within the limit.
    failed_decode: set[str] = set()
    failed_prefill: set[str] = set()
    for attempt_number in range(pd_attempt_limit(views)):
        try:
            attempt = next_pd_attempt(
                views,
                "least-load",
                failed_decode=frozenset(failed_decode),
                failed_prefill=frozenset(failed_prefill),
            )
        except NoBackendError:
            break
        if attempt.prefill is None:
            break
        (failed_prefill if attempt_number % 2 else failed_decode).add(
            attempt.prefill if attempt_number % 2 else attempt.decode
        )
    else:
        raise AssertionError("the attempts did not end within the limit")
    assert attempt_number < pd_attempt_limit(views)


def test_only_a_503_kv_cache_full_answer_is_a_no_room_refusal():
    full = '{"error":{"message":"no room","type":"service_unavailable_error","param":null,"code":"kv_cache_full"}}'
    assert isinstance(_refusal(503, full), Full)
    assert str(_refusal(503, full)).startswith("answered 503: ")
    draining = '{"error":{"message":"the server is draining","type":"service_unavailable_error"}}'
    for status, detail in [
        (503, draining),
        (502, full),
        (503, "kv_cache_full"),
        (503, "[]"),
        (503, '{"error":"x"}'),
    ]:
        refusal = _refusal(status, detail)
        assert not isinstance(refusal, Full) and refusal.startswith(f"answered {status}: ")
