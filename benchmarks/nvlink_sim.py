"""The `nvlink` dispatcher's kernel cost on ONE GPU: W ranks' buffers on the same GPU (`SimGroup`), every rank's
dispatch -> identity experts -> combine launched in turn, so the "remote" writes go to local HBM. What this
measures: the dispatcher's own kernels and launches per rank and round trip (no NVLink, no barrier wait); the
2-GPU number comes from benchmarks/ep_dispatch.py --backends nvlink,nvlink-graph.

    python3 benchmarks/nvlink_sim.py [--tokens 128,256] [--hidden 7168] [--top-k 8] [--experts 256] [--ranks 2]

Prints one table: per rank and round trip, eager and replayed from a CUDA graph (median of --iters), and the
bytes each rank moves (dispatch + combine rows) with the implied local bandwidth."""

from __future__ import annotations

import argparse
import statistics

import torch
from moefleet.engine.distributed.nvlink import NvlinkDispatcher, NvlinkPool, SimFabric, SimGroup


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="128,256")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    print(
        f"nvlink dispatcher, {args.ranks} ranks simulated on one {torch.cuda.get_device_name(device)}, hidden "
        f"{args.hidden} bf16, top-{args.top_k} of {args.experts}, identity experts; us per rank per round trip"
    )
    print("| tokens/rank | eager us | graph us | MB moved/rank | GB/s (graph) |\n|---|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        eager, replay = measure(tokens, args, device)
        moved = 2 * tokens * args.top_k * args.hidden * 2  # rows out and back, bf16
        print(f"| {tokens} | {eager:.0f} | {replay:.0f} | {moved / 1e6:.1f} | {moved / replay / 1e3:.0f} |")


def measure(tokens: int, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(eager, graph) us per rank per round trip."""
    sim = SimGroup(args.ranks, device)
    ranks = [
        NvlinkDispatcher(NvlinkPool(SimFabric(sim, r)), args.experts, args.hidden, tokens)
        for r in range(args.ranks)
    ]
    gen = torch.Generator().manual_seed(tokens)
    ids = [
        torch.stack([torch.randperm(args.experts, generator=gen)[: args.top_k] for _ in range(tokens)]).to(
            device
        )
        for _ in ranks
    ]
    xs = [torch.randn(tokens, args.hidden, generator=gen).to(device, torch.bfloat16) for _ in ranks]
    ws = [torch.rand(tokens, args.top_k, generator=gen).to(device) for _ in ranks]

    def run() -> None:
        pend = [
            d.dispatch_start(x, i, w, is_prefill=False) for d, x, i, w in zip(ranks, xs, ids, ws, strict=True)
        ]
        got = [d.dispatch_finish(q) for d, q in zip(ranks, pend, strict=True)]
        back = [d.combine_start(g.hidden, g) for d, g in zip(ranks, got, strict=True)]
        for d, b in zip(ranks, back, strict=True):
            d.combine_finish(b)

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize(device)
        times = []
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(args.iters):
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b) * 1000 / args.ranks)
        return statistics.median(times)

    eager = timed(run)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        run()
    return eager, timed(graph.replay)


if __name__ == "__main__":
    main()
