"""KV pools for the transfer backends' unit tests (tcp, p2p): two layer kinds, filled pools, block views and a
receiver registration that records how the transfer ended."""

from __future__ import annotations

import threading
from typing import Any

import torch
from moefleet.engine.disaggregation.base import KVReceiver, TransferResult
from moefleet.engine.kv_cache import KVCachePool


class GQALayer:
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, 2, 8)


class MLALayer:
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, 12)  # latent R + rope Dr only


def pool(dtype=torch.float32, num_blocks=6, layers=None) -> KVCachePool:
    layers = layers or [GQALayer(), MLALayer(), GQALayer()]
    return KVCachePool(layers, num_blocks, 4, dtype, torch.device("cpu"))


def pools(dtype=torch.float32, num_blocks=6) -> tuple[KVCachePool, KVCachePool]:
    """A source pool filled with random values and an empty destination of the same layout."""
    src, dst = pool(dtype, num_blocks), pool(dtype, num_blocks)
    for cache in src.caches:
        cache.copy_(torch.randn(cache.shape).to(dtype))
    return src, dst


def block(kv: KVCachePool, layer: int, index: int) -> torch.Tensor:
    """One block of one layer by plain indexing (the oracle for what a transfer moved)."""
    cache = kv.caches[layer]
    return cache[:, index] if cache.dim() == 5 else cache[index]


def moved(src: KVCachePool, dst: KVCachePool, pairs: list[tuple[int, int]]) -> bool:
    """Every layer's block d of `dst` equals block s of `src`, for each (s, d)."""
    return all(
        torch.equal(block(dst, layer, d), block(src, layer, s))
        for layer in range(src.num_layers)
        for s, d in pairs
    )


def send_concurrently(sends: list[tuple[Any, str, str, list[int], int, int]]) -> None:
    """(sender, address, transfer id, blocks, num_tokens, first_token) each from its own thread, all at once;
    waits up to 30 s for each."""
    threads = [threading.Thread(target=sender.send, args=args) for sender, *args in sends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def expect(receiver: KVReceiver, transfer_id: str, blocks: list[int], num_tokens: int):
    """Register a transfer; returns (results, done): the TransferResult lands in results, done is set."""
    results: list[TransferResult] = []
    done = threading.Event()

    def on_landed(result: TransferResult) -> None:
        results.append(result)
        done.set()

    receiver.register(transfer_id, blocks, num_tokens, on_landed)
    return results, done
