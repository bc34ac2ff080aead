"""On 2 NVIDIA GPUs: the `p2p` KV transfer over an NCCL pair group, sender pool on GPU 0, receiver pool on
GPU 1 (one process, two threads), bf16, GQA and MLA layers, many chunks; the pair reused; a tcp sender into
the same receiver. Oracle: the landed blocks equal the sent ones read by plain indexing. Not run yet (written
on a CPU-only machine); skipped without 2 GPUs (CI)."""

from __future__ import annotations

import threading

import pytest
import torch
from moefleet.engine.disaggregation.p2p import P2PSender
from moefleet.engine.disaggregation.receiver import KVServer
from moefleet.engine.disaggregation.tcp import TcpSender
from moefleet.engine.kv_cache import KVCachePool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs"),
    pytest.mark.timeout(300),
]


class GQALayer:
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, 4, 128)


class MLALayer:
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, 576)


def _block(pool: KVCachePool, layer: int, block: int) -> torch.Tensor:
    cache = pool.caches[layer]
    return (cache[:, block] if cache.dim() == 5 else cache[block]).cpu()


def test_p2p_moves_blocks_from_gpu_0_to_gpu_1_over_nccl():
    layers = [GQALayer(), MLALayer(), GQALayer(), MLALayer()]
    src = KVCachePool(layers, 32, 64, torch.bfloat16, torch.device("cuda", 0))
    dst = KVCachePool([type(x)() for x in layers], 32, 64, torch.bfloat16, torch.device("cuda", 1))
    for cache in src.caches:
        cache.normal_()
    receiver = KVServer(dst, "127.0.0.1")
    sender = P2PSender(src, chunk_bytes=1 << 18)  # several chunks; a 3-block GQA layer (384 KiB) is cut
    try:
        for transfer, (s, d), backend in [
            ("g1", ([3, 9, 20], [0, 1, 2]), sender),
            ("g2", ([4], [30]), sender),
            ("g3", ([5, 6], [10, 11]), TcpSender(src)),
        ]:
            done = threading.Event()
            results = []
            receiver.register(
                transfer,
                d,
                64 * len(d),
                lambda r, done=done, results=results: (results.append(r), done.set()),
            )
            backend.send(receiver.address, transfer, s, 64 * len(s), first_token=5)
            assert done.wait(30) and results[0].error is None and results[0].first_token == 5
            for layer in range(len(layers)):
                for a, b in zip(s, d, strict=True):
                    assert torch.equal(_block(dst, layer, b), _block(src, layer, a))
        assert len(sender._pairs) == 1
        assert not _block(dst, 0, 5).any()  # untouched
    finally:
        sender.close()
        receiver.close()
