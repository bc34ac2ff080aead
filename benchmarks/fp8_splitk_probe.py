"""Decode-size block-FP8 linears: cuBLAS blockwise vs our Triton w8a8 vs the split-K kernel (a config sweep).

Every time is GPU time per call from a CUDA graph of `--calls` back-to-back calls (quantisation included, as in
`Fp8Linear`), median of `--replays` replays: the decode step replays graphs, so launch cost is not counted.
Shapes: DeepSeek-V3's dense decode projections (q_a, kv_a, q_b, o_proj, shared-expert w13 / w2) and Kimi-K2's
q_b / o_proj (64 heads). Prints one table row per (shape, M) and, with `--write PATH`, the measured table
`engine/kernels/fp8_splitk_configs.json` reads (best split-K config + both times, card, date, command).

    source benchmarks/device_setup.sh && python3 benchmarks/fp8_splitk_probe.py --rows 16,32,64,128,256 --write OUT/fp8_splitk_configs.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from moefleet.engine.kernels import fp8_cublas, fp8_splitk
from moefleet.engine.kernels.fp8_blocks import quantize_weight_block
from moefleet.engine.kernels.fp8_splitk_configs import SplitKConfig
from moefleet.engine.kernels.fused_moe import w8a8_block_linear

SHAPES = {  # name: (N, K)
    "dsv3 q_a": (1536, 7168),
    "dsv3 kv_a": (576, 7168),
    "dsv3 q_b": (24576, 1536),
    "dsv3 o_proj": (7168, 16384),
    "dsv3 shared w13": (4096, 7168),
    "dsv3 shared w2": (7168, 2048),
    "kimi q_b": (12288, 1536),
    "kimi o_proj": (7168, 8192),
}


def graph_us(fn, calls: int, replays: int) -> float:
    """GPU microseconds per call of `fn` from a CUDA graph of `calls` calls (median of `replays`)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def candidates(m: int, n: int, k: int, quick: bool) -> list[SplitKConfig]:
    """Row tiles of 64 / 128 (wgmma's 64-row side on the tokens) from 64 rows up; below, and also above, the
    swapped form with 16-64 token tiles (wgmma's narrow side on the tokens). Splits 1-16 within K's blocks.
    Few distinct compile-time variants: each one compiles once per process (~1-2 s)."""
    splits = [s for s in (1, 2, 3, 4, 6, 8, 12, 16) if s <= k // 128]
    stages = (4,) if quick else (3, 4)
    plain = [
        SplitKConfig(bm, bn, s, num_warps=8 if bm == 128 else 4, num_stages=st)
        for bm, bn, s, st in itertools.product((64, 128), (64, 128), splits, stages)
        if m >= 64 and bm <= m
    ]
    token_tiles = [bm for bm in (16, 32, 64) if bm <= max(16, m)]
    swapped = [
        SplitKConfig(bm, bn, s, num_warps=4, num_stages=st, swap_ab=True)
        for bm, bn, s, st in itertools.product(token_tiles, (64, 128), splits, stages)
    ]
    return plain + swapped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="16,32,64,128,256")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--replays", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer configs (stages 4 only)")
    parser.add_argument("--write", help="write the measured table (JSON) here")
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    card = torch.cuda.get_device_name(device)
    print(f"{card}, torch {torch.__version__}; us per call from a CUDA graph of {args.calls} calls")
    print("| shape | N x K | M | cuBLAS us | Triton w8a8 us | split-K us | best config | vs cuBLAS | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    table: dict[str, dict] = {}
    started = time.time()
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device=device) * 0.05
        wq, ws = quantize_weight_block(w, (128, 128))
        del w
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = fp8_cublas.linear(x, wq, ws)
            cublas = graph_us(lambda: fp8_cublas.linear(x, wq, ws), args.calls, args.replays)  # noqa: B023
            triton_us = graph_us(lambda: w8a8_block_linear(x, wq, ws, (128, 128)), args.calls, args.replays)  # noqa: B023
            best: tuple[float, SplitKConfig] | None = None
            for config in candidates(m, n, k, args.quick):
                try:
                    out = fp8_splitk.linear(x, wq, ws, config)
                except Exception as error:  # noqa: BLE001 (a config the compiler refuses: out of shared memory)
                    print(f"  skip {config}: {type(error).__name__}", file=sys.stderr)
                    continue
                err = (out.float() - ref.float()).norm() / ref.float().norm()
                if not err < 2e-2:
                    raise SystemExit(f"{name} M={m} {config}: rel L2 {err:.3e} vs cuBLAS: wrong result")
                us = graph_us(lambda: fp8_splitk.linear(x, wq, ws, config), args.calls, args.replays)  # noqa: B023
                if best is None or us < best[0]:
                    best = (us, config)
            assert best is not None
            us, config = best
            gbs = (n * k + m * k * 2 + m * n * 2) / us / 1e3
            print(
                f"| {name} | {n} x {k} | {m} | {cublas:.1f} | {triton_us:.1f} | {us:.1f} | "
                f"{config.block_m}x{config.block_n} split {config.split} w{config.num_warps} "
                f"s{config.num_stages}{' swap' if config.swap_ab else ''} | {cublas / us:.2f}x | {gbs:,.0f} |",
                flush=True,
            )
            table[f"{m},{n},{k}"] = {
                "config": {
                    "block_m": config.block_m,
                    "block_n": config.block_n,
                    "split": config.split,
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                    "swap_ab": config.swap_ab,
                },
                "us": round(us, 2),
                "cublas_us": round(cublas, 2),
                "triton_us": round(triton_us, 2),
                "shape": name,
            }
    print(f"sweep took {time.time() - started:.0f} s")
    if args.write:
        Path(args.write).write_text(
            json.dumps(
                {
                    "card": card,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "command": "python3 benchmarks/fp8_splitk_probe.py " + " ".join(sys.argv[1:]),
                    "software": f"torch {torch.__version__}",
                    "shapes": table,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
