"""The `p2p` KV transfer backend (pair groups over real gloo, CPU) between two pools in one process, the pool's
device-side gather / scatter, and the chunk plan.

Oracle: the destination blocks equal the source blocks read by plain tensor indexing (cache[:, b] for GQA,
cache[b] for MLA), other blocks stay untouched; the chunk plan against hand-computed chunks; failures
(layout, unknown id, cancel, a sender gone mid-transfer) are errors within seconds, not hangs.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from disaggregation.kv_pools import GQALayer, MLALayer, block, expect, moved, pool, pools, send_concurrently
from moefleet.engine.disaggregation import p2p, wire
from moefleet.engine.disaggregation.base import TransferError
from moefleet.engine.disaggregation.p2p import P2PSender, plan_chunks
from moefleet.engine.disaggregation.receiver import KVServer
from moefleet.engine.disaggregation.tcp import TcpSender

pytestmark = pytest.mark.timeout(120)


def _assert_moved(src, dst, pairs, untouched):
    assert moved(src, dst, pairs)
    for layer in range(src.num_layers):
        for other in untouched:
            assert not block(dst, layer, other).any()


# ---- pool and plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_then_scatter_moves_exactly_the_chosen_blocks(dtype):
    src, dst = pools(dtype)
    layers = range(0, 3)
    staging = torch.empty(src.span_bytes(layers, 2), dtype=torch.uint8)
    assert (
        staging.numel()
        == 2 * (2 * (2 * 4 * 2 * 8) + 4 * 12) * staging.new_empty(0, dtype=dtype).element_size()
    )
    src.gather_blocks(layers, [4, 1], staging)
    # The first layer's piece is cache[:, [4, 1]] laid out as is.
    first = staging[: src.unit_bytes(0) * 2].view(dtype).view(2, 2, 4, 2, 8)
    assert torch.equal(first, src.caches[0][:, [4, 1]])
    dst.scatter_blocks(layers, [0, 5], staging)
    _assert_moved(src, dst, [(4, 0), (1, 5)], untouched=[1, 2, 3, 4])


def test_gather_refuses_a_wrong_staging_size_or_a_block_outside_the_pool():
    src, _ = pools()
    with pytest.raises(ValueError, match="bytes"):
        src.gather_blocks(range(1), [0], torch.empty(3, dtype=torch.uint8))
    with pytest.raises(IndexError, match="outside"):
        src.gather_blocks(range(1), [6], torch.empty(src.span_bytes(range(1), 1), dtype=torch.uint8))


def test_the_chunk_plan_packs_whole_layers_and_splits_a_layer_too_big_for_one_chunk():
    # 3 blocks; layer bytes per block 10, 10, 50, 10: whole layers weigh 30, 30, 150, 30.
    assert plan_chunks([10, 10, 50, 10], 3, 60) == [
        (range(0, 2), slice(0, 3)),
        (range(2, 3), slice(0, 1)),
        (range(2, 3), slice(1, 2)),
        (range(2, 3), slice(2, 3)),
        (range(3, 4), slice(0, 3)),
    ]
    assert plan_chunks([10, 10, 50, 10], 3, 1000) == [(range(0, 4), slice(0, 3))]
    assert plan_chunks([10, 10], 3, 100) == [(range(0, 2), slice(0, 3))]
    assert plan_chunks([40], 5, 100) == [
        (range(0, 1), slice(0, 2)),
        (range(0, 1), slice(2, 4)),
        (range(0, 1), slice(4, 5)),
    ]


# ---- transfers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [100, 1 << 20])  # many chunks (layers split) / one chunk
def test_blocks_move_over_the_pair_group_and_the_pair_is_reused(dtype, chunk_bytes, receiver_of):
    src, dst = pools(dtype)
    receiver = receiver_of(dst)
    sender = P2PSender(src, chunk_bytes=chunk_bytes)
    try:
        results, done = expect(receiver, "t1", [0, 2], num_tokens=7)
        sender.send(receiver.address, "t1", [3, 1], 7, first_token=42)
        assert done.wait(5) and results[0].first_token == 42 and results[0].error is None
        _assert_moved(src, dst, [(3, 0), (1, 2)], untouched=[1, 3, 4, 5])
        pair = sender._pairs[receiver.address]
        results, done = expect(receiver, "t2", [5], num_tokens=2)
        sender.send(receiver.address, "t2", [4], 2, first_token=7)
        assert done.wait(5) and results[0].first_token == 7
        assert sender._pairs[receiver.address] is pair  # one group per (sender, receiver), reused
        _assert_moved(src, dst, [(4, 5)], untouched=[1, 3, 4])
    finally:
        sender.close()


def test_a_layout_mismatch_is_refused_on_both_sides(receiver_of):
    src, _ = pools()
    receiver = receiver_of(pool(layers=[GQALayer(), MLALayer()]))  # one layer less
    results, done = expect(receiver, "t3", [0, 1], num_tokens=5)
    with pytest.raises(TransferError, match="layout differs"):
        P2PSender(src).send(receiver.address, "t3", [0, 1], 5, first_token=1)
    assert done.wait(5) and "layout" in (results[0].error or "")


def test_unknown_and_refused_ids_are_answered(receiver_of, monkeypatch):
    monkeypatch.setattr(wire, "REGISTER_WAIT_SECONDS", 0.3)
    src, dst = pools()
    receiver = receiver_of(dst)
    receiver.refuse("t4", "the decode server rejected the request: too long")
    with pytest.raises(TransferError, match="not expected"):
        P2PSender(src).send(receiver.address, "nobody", [0], 2, first_token=1)
    with pytest.raises(TransferError, match="rejected the request"):
        P2PSender(src).send(receiver.address, "t4", [0], 2, first_token=1)
    assert not dst.caches[0].any()


def test_a_transfer_cancelled_midway_is_drained_not_written_and_fails(receiver_of):
    src, dst = pools()
    receiver = receiver_of(dst)
    gather = src.gather_blocks

    def slow_gather(*args):
        time.sleep(0.1)
        return gather(*args)

    src.gather_blocks = slow_gather  # type: ignore[method-assign]
    results, done = expect(receiver, "t5", [1, 2], num_tokens=8)
    failure: list[BaseException] = []

    def send() -> None:
        try:
            P2PSender(src, chunk_bytes=100).send(receiver.address, "t5", [0, 3], 8, first_token=1)
        except TransferError as exc:
            failure.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(0.4)
    assert receiver.cancel("t5") is False  # under way: its blocks stay reserved until on_landed
    thread.join(30)
    assert done.wait(5) and "aborted during the transfer" in (results[0].error or "")
    assert failure and "not acknowledged" in str(failure[0])
    # 6 chunks of one (layer, block) each, 0.1 s apart: the last layer's arrive after the cancel, drained.
    assert not dst.caches[2].any()


def test_a_sender_gone_midway_fails_the_transfer_quickly_and_the_next_one_works(receiver_of):
    src, dst = pools()
    receiver = receiver_of(dst)
    sender = P2PSender(src, chunk_bytes=100)
    gather, calls = src.gather_blocks, []

    def failing_gather(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("prefill engine died")
        return gather(*args)

    src.gather_blocks = failing_gather  # type: ignore[method-assign]
    results, done = expect(receiver, "t6", [1], num_tokens=4)
    started = time.monotonic()
    with pytest.raises(TransferError, match="prefill engine died"):
        sender.send(receiver.address, "t6", [0], 4, first_token=1)
    assert done.wait(10) and time.monotonic() - started < 10
    # Seen by the control connection (closed) or by gloo (its pair connection broke), whichever is first.
    assert results[0].first_token is None and "chunk" in (results[0].error or ""), results[0]
    assert receiver.address not in sender._pairs  # dropped on both sides
    src.gather_blocks = gather  # type: ignore[method-assign]
    results, done = expect(receiver, "t7", [2], num_tokens=4)
    sender.send(receiver.address, "t7", [5], 4, first_token=3)
    assert done.wait(5) and results[0].first_token == 3
    _assert_moved(src, dst, [(5, 2)], untouched=[0, 3, 4, 5])
    sender.close()


def test_a_pair_group_that_cannot_form_is_an_error_that_names_the_way_out(receiver_of, monkeypatch):
    monkeypatch.setattr(p2p, "PAIR_TIMEOUT_SECONDS", 1.0)
    src, dst = pools()
    receiver = receiver_of(dst)
    monkeypatch.setattr(
        p2p.P2PData, "_make", lambda self, key, sock: time.sleep(30)
    )  # the receiver never joins
    results, done = expect(receiver, "t8", [1], num_tokens=4)
    started = time.monotonic()
    with pytest.raises(TransferError, match="--kv-transfer tcp"):
        P2PSender(src).send(receiver.address, "t8", [0], 4, first_token=1)
    assert done.wait(10) and results[0].error and time.monotonic() - started < 10


def test_tcp_and_p2p_senders_push_to_the_same_receiver_at_once(receiver_of):
    src, dst = pools(num_blocks=8)
    receiver = receiver_of(dst)
    p2p_sender, tcp_sender = P2PSender(src, chunk_bytes=200), TcpSender(src, chunk_bytes=100)
    expected = []
    sends = []
    for i, (sender, s, d) in enumerate(
        [(p2p_sender, 0, 4), (tcp_sender, 1, 5), (p2p_sender, 2, 6), (tcp_sender, 3, 7)]
    ):
        expected.append(expect(receiver, f"m{i}", [d], num_tokens=3))
        sends.append((sender, receiver.address, f"m{i}", [s], 3, 10 + i))
    send_concurrently(sends)
    assert [(done.wait(5), results[0].first_token) for results, done in expected] == [
        (True, 10 + i) for i in range(4)
    ]
    _assert_moved(src, dst, [(0, 4), (1, 5), (2, 6), (3, 7)], untouched=[0, 1, 2, 3])
    p2p_sender.close()


# ---- selection ------------------------------------------------------------------------------------------


def test_auto_is_p2p_on_cuda_tcp_on_host_pools_and_the_flag_reaches_the_sender(monkeypatch, tmp_path):
    from moefleet.engine.cli import CommandError, build_parser
    from moefleet.engine.disaggregation.base import choose_kv_transfer, create_transfer
    from moefleet.engine.entrypoints.serve_command import check_args

    assert [choose_kv_transfer(x) for x in ("auto", "tcp", "p2p")] == ["tcp", "tcp", "p2p"]
    assert [choose_kv_transfer(x, "cuda") for x in ("auto", "tcp", "p2p")] == ["p2p", "tcp", "p2p"]
    with pytest.raises(ValueError, match="auto, tcp, p2p"):
        choose_kv_transfer("nccl")
    src, _ = pools()
    for backend, kind in [("auto", TcpSender), ("p2p", P2PSender)]:
        sender, receiver = create_transfer(src, "127.0.0.1", backend=backend)
        assert isinstance(sender, kind) and isinstance(receiver, KVServer)
        receiver.close()
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("MOEFLEET_KV_TRANSFER", "p2p")
    assert build_parser().parse_args(["serve", "--model", str(tmp_path)]).kv_transfer == "p2p"
    assert (
        build_parser().parse_args(["serve", "--model", str(tmp_path), "--kv-transfer", "tcp"]).kv_transfer
        == "tcp"
    )
    monkeypatch.setenv("MOEFLEET_KV_TRANSFER", "nccl")
    with pytest.raises(CommandError, match="--kv-transfer 'nccl'"):
        check_args(build_parser().parse_args(["serve", "--model", str(tmp_path)]))
