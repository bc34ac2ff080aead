"""KV transfer over the `tcp` backend on loopback (CPU, host memory): time per request and throughput.

Two KV cache pools with DeepSeek-V3's MLA cache shape (61 layers x 576 bf16 values per token: the compressed
latent and the roped key, all that moves) and with a GQA shape for contrast (48 layers x 2 x 4 KV heads x 128,
Qwen3-235B-A22B-like), block size 16; one request's blocks pushed from one pool to the other, best of
`--repeats`. Prints a table. Loopback on a shared machine: indicative of the host-staged path's overhead,
not of a network.

    .venv/bin/python benchmarks/kv_transfer_cpu.py [--tokens 512 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from moefleet.engine.disaggregation.receiver import KVServer as TcpReceiver
from moefleet.engine.disaggregation.tcp import TcpSender
from moefleet.engine.kv_cache import KVCachePool

BLOCK = 16


class _Layer:
    def __init__(self, shape_of):
        self.kv_cache_shape = shape_of


LAYOUTS = {
    "MLA (DeepSeek-V3)": (61, lambda n, bs: (n, bs, 576)),
    "GQA (Qwen3-235B)": (48, lambda n, bs: (2, n, bs, 4, 128)),
}


def run(tokens: int, repeats: int, layers: int, shape) -> tuple[float, int]:
    blocks = -(-tokens // BLOCK)
    make = lambda: KVCachePool(  # noqa: E731
        [_Layer(shape) for _ in range(layers)], blocks, BLOCK, torch.bfloat16, torch.device("cpu")
    )
    src, dst = make(), make()
    for cache in src.caches:
        cache.normal_()
    receiver = TcpReceiver(dst, "127.0.0.1")
    best = float("inf")
    try:
        for i in range(repeats):
            done = threading.Event()
            receiver.register(f"r{i}", list(range(blocks)), tokens, lambda _result, done=done: done.set())
            started = time.perf_counter()
            TcpSender(src).send(receiver.address, f"r{i}", list(range(blocks)), tokens, 0)
            best = min(best, time.perf_counter() - started)
            assert done.is_set()
        assert all(torch.equal(a, b) for a, b in zip(src.caches, dst.caches, strict=True))
    finally:
        receiver.close()
    return best, blocks * src.bytes_per_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| layout | prompt tokens | KV bytes | time per request | throughput |")
    print("|---|---:|---:|---:|---:|")
    for name, (layers, shape) in LAYOUTS.items():
        for tokens in args.tokens:
            seconds, size = run(tokens, args.repeats, layers, shape)
            print(
                f"| {name} | {tokens} | {size / 2**20:.1f} MiB | {seconds * 1e3:.1f} ms | "
                f"{size / seconds / 2**30:.2f} GiB/s |"
            )


if __name__ == "__main__":
    main()
