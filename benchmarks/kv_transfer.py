"""KV transfer time per request, `tcp` vs `p2p` side by side: a sender process pushes one request's KV blocks
to a receiver process (`--device cpu`: host pools, loopback, p2p over gloo; `--device cuda`: sender pool on
GPU 0, receiver pool on GPU 1, p2p over NCCL).

Layouts (real cache shapes of one request, all layers): DeepSeek-V3 MLA (61 layers x 576 bf16 values per
token: the compressed latent + roped key, all that moves) and Qwen3-235B-A22B GQA (94 layers x K and V x 4 KV
heads x 128, bf16); block size 64. Each (layout, prompt length, backend): one warm-up transfer (p2p: builds
the pair group), then the best of `--repeats`; the receiver checks the landed blocks equal the sent ones.

    .venv/bin/python benchmarks/kv_transfer.py [--device cpu|cuda] [--tokens 2048 8192 32768] [--repeats 3]
        [--layouts mla gqa] [--backends tcp p2p] [--chunk-mib 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from typing import Any

import torch

BLOCK = 64
LAYOUTS: dict[str, tuple[str, int, Any]] = {
    "mla": ("MLA DeepSeek-V3", 61, lambda n, bs: (n, bs, 576)),
    "gqa": ("GQA Qwen3-235B", 94, lambda n, bs: (2, n, bs, 4, 128)),
}


class _Layer:
    def __init__(self, shape_of: Any):
        self.kv_cache_shape = shape_of


def _pool(layout: str, num_blocks: int, device: str) -> Any:
    from moefleet.engine.kv_cache import KVCachePool

    _, layers, shape = LAYOUTS[layout]
    return KVCachePool(
        [_Layer(shape) for _ in range(layers)], num_blocks, BLOCK, torch.bfloat16, torch.device(device)
    )


def _digest(pool: Any, blocks: list[int]) -> list[float]:
    index = torch.tensor(blocks, device=pool.caches[0].device)
    return [
        float(c.index_select(d, index).float().sum())
        for c, d in zip(pool.caches, pool.block_dims, strict=True)
    ]


def receiver_main(conn: Any, device: str) -> None:
    """The receiver process: one pool + KVServer per layout, registrations on request."""
    from moefleet.engine.disaggregation.receiver import KVServer

    server, pool = None, None
    landed: dict[str, threading.Event] = {}
    while True:
        command, *args = conn.recv()
        if command == "layout":
            if server is not None:
                server.close()
            pool = _pool(args[0], args[1], device)
            server = KVServer(pool, "127.0.0.1")
            conn.send(server.address)
        elif command == "expect":
            transfer_id, blocks, tokens = args
            done = landed[transfer_id] = threading.Event()
            assert server is not None
            server.register(transfer_id, blocks, tokens, lambda result, done=done: done.set())
            conn.send("ok")
        elif command == "digest":
            transfer_id, blocks = args
            landed.pop(transfer_id).wait(60)
            conn.send(_digest(pool, blocks))
        else:
            if server is not None:
                server.close()
            conn.send("bye")
            return


def run(args: argparse.Namespace) -> list[tuple[str, int, float, dict[str, float]]]:
    from moefleet.engine.disaggregation.p2p import P2PSender
    from moefleet.engine.disaggregation.tcp import TcpSender

    send_device = "cuda:0" if args.device == "cuda" else "cpu"
    recv_device = "cuda:1" if args.device == "cuda" else "cpu"
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=receiver_main, args=(theirs, recv_device), daemon=True)
    child.start()

    def ask(*message: Any) -> Any:
        ours.send(message)
        return ours.recv()

    rows = []
    try:
        for layout in args.layouts:
            most = -(-max(args.tokens) // BLOCK)
            src = _pool(layout, most, send_device)
            for cache in src.caches:
                cache.normal_()
            address = ask("layout", layout, most)
            senders = {"tcp": TcpSender(src), "p2p": P2PSender(src, chunk_bytes=args.chunk_mib << 20)}
            for tokens in args.tokens:
                blocks = list(range(-(-tokens // BLOCK)))
                size = src.span_bytes(range(src.num_layers), len(blocks))
                times: dict[str, float] = {}
                for backend in args.backends:
                    best = float("inf")
                    for i in range(args.repeats + 1):
                        transfer = f"{layout}-{tokens}-{backend}-{i}"
                        ask("expect", transfer, blocks, tokens)
                        if args.device == "cuda":
                            torch.cuda.synchronize(0)
                        started = time.perf_counter()
                        senders[backend].send(address, transfer, blocks, tokens, 0)
                        elapsed = time.perf_counter() - started
                        if i:
                            best = min(best, elapsed)
                        got = ask("digest", transfer, blocks)
                        assert got == _digest(src, blocks), f"{transfer}: landed blocks differ"
                    times[backend] = best
                rows.append((LAYOUTS[layout][0], tokens, size, times))
            for sender in senders.values():
                sender.close()
    finally:
        ask("stop")
        child.join(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["mla", "gqa"])
    parser.add_argument("--backends", nargs="+", choices=("tcp", "p2p"), default=["tcp", "p2p"])
    parser.add_argument("--chunk-mib", type=int, default=64, help="p2p staging chunk (default 64 MiB)")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        parser.error("--device cuda needs 2 GPUs (sender on GPU 0, receiver on GPU 1)")
    rows = run(args)
    head = " | ".join(f"{b} ms | {b} GB/s" for b in args.backends)
    print(f"| layout | tokens | MB | {head} |" + (" p2p / tcp time |" if len(args.backends) == 2 else ""))
    print(
        "|---|---:|---:|" + "---:|" * (2 * len(args.backends)) + ("---:|" if len(args.backends) == 2 else "")
    )
    for name, tokens, size, times in rows:
        cells = " | ".join(f"{times[b] * 1e3:.1f} | {size / times[b] / 1e9:.2f}" for b in args.backends)
        ratio = f" {times['p2p'] / times['tcp']:.2f} |" if len(args.backends) == 2 else ""
        print(f"| {name} | {tokens} | {size / 1e6:.1f} | {cells} |{ratio}")


if __name__ == "__main__":
    main()
