"""KV cache pool and the `tcp` transfer backend between two pools (real sockets, one process).

Oracle: the destination blocks equal the source blocks read by plain tensor indexing (cache[:, b] for GQA,
cache[b] for MLA), other blocks stay untouched; failures (layout, checksum, unknown id) are errors, not hangs.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from disaggregation.kv_pools import GQALayer, MLALayer, block, expect, pools
from moefleet.engine.disaggregation import tcp, wire
from moefleet.engine.disaggregation.base import TransferError
from moefleet.engine.disaggregation.receiver import KVServer as TcpReceiver
from moefleet.engine.disaggregation.tcp import TcpSender
from moefleet.engine.kv_cache import KVCachePool, block_dim


def test_the_pool_owns_each_layers_cache_and_finds_the_block_dimension():
    layers = [GQALayer(), MLALayer()]
    pool = KVCachePool(layers, 5, 4, torch.float32, torch.device("cpu"))
    assert [block_dim(layer, 4) for layer in layers] == [1, 0]
    assert layers[0].kv_cache is pool.caches[0] and tuple(layers[1].kv_cache.shape) == (5, 4, 12)
    assert pool.unit_bytes(0) == 2 * 4 * 2 * 8 * 4 and pool.unit_bytes(1) == 4 * 12 * 4
    assert pool.bytes_per_block == pool.unit_bytes(0) + pool.unit_bytes(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_move_between_pools_in_small_chunks(dtype):
    src, dst = pools(dtype)
    receiver = TcpReceiver(dst, "127.0.0.1")
    try:
        results, done = expect(receiver, "t1", [0, 2], num_tokens=7)
        # 7 tokens in 2 blocks of 4; chunks smaller than one unit, so units span chunks.
        TcpSender(src, chunk_bytes=100).send(receiver.address, "t1", [3, 1], 7, first_token=42)
        assert done.wait(5) and results[0].first_token == 42 and results[0].error is None
        for layer in range(3):
            assert torch.equal(block(dst, layer, 0), block(src, layer, 3))
            assert torch.equal(block(dst, layer, 2), block(src, layer, 1))
            for untouched in (1, 3, 4, 5):
                assert not block(dst, layer, untouched).any()
    finally:
        receiver.close()


def test_the_first_tokens_logprob_entry_rides_the_header_and_is_optional():
    """With `first_logprob` the receiver reports it exactly (JSON floats round-trip); without it (a sender that
    predates the field, or a request that asked for none) the header has no such field and the result None."""
    from moefleet.engine.logprobs import from_wire, to_wire
    from moefleet.engine.sampling_params import TokenLogprob

    src, dst = pools()
    entry = TokenLogprob(42, -0.123456789012345, [(42, -0.123456789012345), (7, -2.5000000001)])
    assert "first_logprob" not in tcp.transfer_header(src, "x", [0], 3, 42)
    receiver = TcpReceiver(dst, "127.0.0.1")
    try:
        for transfer_id, sent in (("with", to_wire(entry)), ("without", None)):
            results, done = expect(receiver, transfer_id, [0], num_tokens=3)
            TcpSender(src).send(receiver.address, transfer_id, [1], 3, first_token=42, first_logprob=sent)
            assert done.wait(5) and results[0].error is None and results[0].first_token == 42
            assert from_wire(results[0].first_logprob) == (entry if sent is not None else None)
    finally:
        receiver.close()


def test_a_layout_mismatch_is_refused_and_reported_on_both_sides():
    src, _ = pools()
    other = KVCachePool([GQALayer(), MLALayer()], 6, 4, torch.float32, torch.device("cpu"))  # one layer less
    receiver = TcpReceiver(other, "127.0.0.1")
    try:
        results, done = expect(receiver, "t2", [0, 1], num_tokens=5)
        with pytest.raises(TransferError, match="layout differs"):
            TcpSender(src).send(receiver.address, "t2", [0, 1], 5, first_token=1)
        assert done.wait(5) and results[0].first_token is None and "layout" in (results[0].error or "")
    finally:
        receiver.close()


def test_a_corrupted_chunk_fails_the_checksum():
    src, dst = pools()

    class Corrupting(TcpSender):
        @staticmethod
        def _send_chunk(sock, data):
            crc = tcp.zlib.crc32(data)
            data = bytearray(data)
            data[0] ^= 0xFF
            sock.sendall(tcp._CHUNK.pack(len(data), crc) + data)

    receiver = TcpReceiver(dst, "127.0.0.1")
    try:
        results, done = expect(receiver, "t3", [4], num_tokens=3)
        with pytest.raises(TransferError):
            Corrupting(src).send(receiver.address, "t3", [0], 3, first_token=1)
        assert done.wait(5) and "checksum" in (results[0].error or "")
    finally:
        receiver.close()


def test_an_unexpected_transfer_id_is_refused_after_the_wait(monkeypatch):
    monkeypatch.setattr(wire, "REGISTER_WAIT_SECONDS", 0.2)
    src, dst = pools()
    receiver = TcpReceiver(dst, "127.0.0.1")
    try:
        with pytest.raises(TransferError, match="not expected"):
            TcpSender(src).send(receiver.address, "nobody", [0], 2, first_token=1)
        # A registration cancelled before any byte arrived frees at once.
        receiver.register("t4", [1], 2, lambda result: None)
        assert receiver.cancel("t4") is True
    finally:
        receiver.close()


def test_a_transfer_that_arrives_before_its_registration_waits_for_it():
    src, dst = pools()
    receiver = TcpReceiver(dst, "127.0.0.1")
    try:
        sender = threading.Thread(target=TcpSender(src).send, args=(receiver.address, "t5", [2], 4, 9))
        sender.start()
        threading.Event().wait(0.2)
        results, done = expect(receiver, "t5", [5], num_tokens=4)
        sender.join(5)
        assert done.wait(5) and results[0].first_token == 9
        assert torch.equal(block(dst, 1, 5), block(src, 1, 2))
    finally:
        receiver.close()


def test_a_sender_for_a_cancelled_or_refused_id_is_answered_at_once(monkeypatch):
    monkeypatch.setattr(wire, "REGISTER_WAIT_SECONDS", 20.0)
    src, dst = pools()
    receiver = TcpReceiver(dst, "127.0.0.1")
    try:
        receiver.register("t6", [1], 2, lambda result: None)
        assert receiver.cancel("t6") is True
        receiver.refuse("t7", "the decode server rejected the request: too long")
        started = time.monotonic()
        with pytest.raises(TransferError, match="aborted before its KV arrived"):
            TcpSender(src).send(receiver.address, "t6", [0], 2, first_token=1)
        with pytest.raises(TransferError, match="rejected the request"):
            TcpSender(src).send(receiver.address, "t7", [0], 2, first_token=1)
        assert time.monotonic() - started < 5
        assert not dst.caches[0].any()
    finally:
        receiver.close()
