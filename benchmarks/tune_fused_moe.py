"""Tune and benchmark the fused MoE Triton kernels on a GPU; prints markdown tables.

    python3 benchmarks/tune_fused_moe.py --tune --budget-s 150   # sweep configs, write fused_moe_configs.json
    python3 benchmarks/tune_fused_moe.py --bench                 # fused (tuned/default) vs the torch path

Shapes (per GPU): DeepSeek-V3 experts (D=7168, I=2048) with 4 local experts (EP64/EP72 decode) receiving
256 sequences x top-8 = 2,048 rows, rows already grouped by the dispatcher; Qwen3-30B-A3B (D=2048, I=768)
with all 128 experts on one GPU and 256 tokens x top-8 hits (token layout), plus prefill-sized rows.
TFLOP/s counts 6 x rows x D x I (gate, up and down GEMMs over the real rows, padding excluded).
The torch path is `Experts.forward_padded` (one bmm over rows padded to the busiest expert, bf16); for FP8
it is the same bmm on weights dequantised to bf16 ahead of time (what `--quantization none` runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, layout, E, D, I, tokens, top_k or None for grouped rows)
SHAPES = [
    ("deepseek-v3 E4 decode", "grouped", 4, 7168, 2048, 2048, None),
    ("deepseek-v3 E4 prefill", "grouped", 4, 7168, 2048, 16384, None),
    ("qwen3-30b-a3b E128 decode", "topk", 128, 2048, 768, 256, 8),
    ("qwen3-30b-a3b E128 prefill", "topk", 128, 2048, 768, 4096, 8),
    # one GPU holding all 256 experts (`moefleet bench --preset deepseek-v3` without --emulate-ep)
    ("deepseek-v3 E256 decode", "topk", 256, 7168, 2048, 256, 8),
    ("deepseek-v3 E256 prefill", "topk", 256, 7168, 2048, 16384, 8),
    # EP32 prefill (the reference deployment): (256 + 32) / 32 = 9 experts, 16,384 tokens x top-8 rows per GPU
    ("deepseek-v3 E9 prefill", "grouped", 9, 7168, 2048, 131072, None),
]


def make_inputs(layout, num_experts, hidden, inter, tokens, top_k, fp8):
    from moefleet.engine.kernels.fp8_quant import quantize_weight_block

    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, device="cuda", generator=g) / inter**0.5
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    inputs = {"x": x, "w13": w13.bfloat16(), "w2": w2.bfloat16()}
    if fp8:
        q13 = [quantize_weight_block(w, (128, 128)) for w in w13]
        q2 = [quantize_weight_block(w, (128, 128)) for w in w2]
        inputs["w13q"] = torch.stack([q for q, _ in q13])
        inputs["w13s"] = torch.stack([s for _, s in q13])
        inputs["w2q"] = torch.stack([q for q, _ in q2])
        inputs["w2s"] = torch.stack([s for _, s in q2])
    if layout == "topk":
        scores = torch.rand(tokens, num_experts, device="cuda", generator=g)
        tw, ids = scores.topk(top_k, dim=1)
        inputs["ids"], inputs["tw"] = ids, tw
        rows = tokens * top_k
    else:
        rows = tokens
        base = rows // num_experts
        counts = [base] * num_experts
        counts[-1] += rows - base * num_experts
        inputs["counts"] = torch.tensor(counts, device="cuda", dtype=torch.int32)
        inputs["counts_list"] = counts
    return inputs, rows


def fused_call(layout, inputs, fp8, config):
    from moefleet.engine.kernels import fused_moe

    if fp8:
        w = dict(w13_scale=inputs["w13s"], w2_scale=inputs["w2s"], block_shape=(128, 128))
        w13, w2 = inputs["w13q"], inputs["w2q"]
    else:
        w, w13, w2 = {}, inputs["w13"], inputs["w2"]
    if layout == "topk":
        return lambda: fused_moe.fused_experts_topk(
            inputs["x"], w13, w2, inputs["ids"], inputs["tw"], config=config, **w
        )
    return lambda: fused_moe.fused_experts_grouped(inputs["x"], inputs["counts"], w13, w2, config=config, **w)


def torch_call(layout, inputs):
    from moefleet.engine.layers.experts import Experts
    from moefleet.engine.layers.token_dispatch import LocalDispatcher

    num_experts, two_inter, hidden = inputs["w13"].shape
    experts = Experts(range(num_experts), hidden, two_inter // 2)
    experts.w13 = torch.nn.Parameter(inputs["w13"], requires_grad=False)
    experts.w2 = torch.nn.Parameter(inputs["w2"], requires_grad=False)
    if layout == "topk":
        dispatcher = LocalDispatcher(num_experts)

        def run():
            d = dispatcher.dispatch_start(inputs["x"], inputs["ids"], inputs["tw"])
            out = experts.forward_padded(d.hidden, d.tokens_per_expert)
            return dispatcher.combine_start(out, d)

        return run
    return lambda: experts.forward_padded(inputs["x"], inputs["counts_list"])


def time_ms(fn, reps=20):
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=reps * 5)


def candidates(fp8, rows_per_expert):
    """Most promising first (the sweep stops at its time budget)."""
    if rows_per_expert <= 64:
        block_ms = [16, 32, 64]
    elif rows_per_expert <= 256:
        block_ms = [64, 128, 32]
    else:
        block_ms = [128, 64]
    block_ns = [128, 64] if fp8 else [64, 128]
    block_ks = [128] if fp8 else [64, 128]
    warps = [4, 8]
    stages = [3, 2, 4] if fp8 else [3, 4]
    from moefleet.engine.kernels.fused_moe_configs import MoEConfig

    for bm, bn, bk, s, w in itertools.product(block_ms, block_ns, block_ks, stages, warps):
        if bm * bn >= 128 * 128 and w == 4:
            continue
        yield MoEConfig(
            block_m=bm, block_n=bn, block_k=bk, group_m=1 if bm <= 16 else 8, num_warps=w, num_stages=s
        )


def tune(budget_s: float, out_path: Path, dtypes: tuple[str, ...], shape_filter: str) -> None:
    from moefleet.engine.kernels.fused_moe_configs import _device_name, shape_key

    table = json.loads(out_path.read_text()) if out_path.is_file() else {}
    deadline = time.time() + budget_s
    jobs = [
        (s, fp8)
        for s in SHAPES
        for fp8 in (False, True)
        if ("fp8" if fp8 else "bf16") in dtypes and any(f in s[0] for f in shape_filter.split(","))
    ]
    per_job = budget_s / max(len(jobs), 1)
    print("| shape | dtype | rows | best config | ms | configs tried |\n|---|---|---|---|---|---|")
    for (name, layout, e, d, i, tokens, top_k), fp8 in jobs:
        if time.time() > deadline:
            break
        inputs, rows = make_inputs(layout, e, d, i, tokens, top_k, fp8)
        job_end = min(deadline, time.time() + per_job)
        key = shape_key(e, i, d, fp8, _device_name())
        previous = {int(m): c for m, c in table.get(key, [])}.get(rows)
        best, best_ms, tried = None, float("inf"), 0
        if previous is not None:  # the checked-in winner competes again
            from moefleet.engine.kernels.fused_moe_configs import MoEConfig

            best = MoEConfig(**previous)
            best_ms = time_ms(fused_call(layout, inputs, fp8, best), reps=10)
        for config in candidates(fp8, rows / e):
            if time.time() > job_end:
                break
            try:
                ms = time_ms(fused_call(layout, inputs, fp8, config), reps=10)
            except Exception as exc:  # out of shared memory / registers for this config
                print(f"  skip {config}: {type(exc).__name__}", file=sys.stderr)
                continue
            tried += 1
            if ms < best_ms:
                best, best_ms = config, ms
        if best is None:
            continue
        entries = {int(m): c for m, c in table.get(key, [])}
        entries[rows] = best.to_dict()
        table[key] = sorted(([m, c] for m, c in entries.items()), key=lambda x: x[0])
        print(f"| {name} | {'fp8' if fp8 else 'bf16'} | {rows} | {best} | {best_ms:.3f} | {tried} |")
        out_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        del inputs
        torch.cuda.empty_cache()


def bench() -> None:
    from moefleet.engine.kernels import fused_moe_configs

    fused_moe_configs._table.cache_clear()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| shape | rows | torch bf16 ms | fused bf16 ms | fused fp8 ms | torch TFLOP/s | fused bf16 TFLOP/s | "
        "fused fp8 TFLOP/s | fused bf16 / torch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, layout, e, d, i, tokens, top_k in SHAPES:
        inputs, rows = make_inputs(layout, e, d, i, tokens, top_k, fp8=True)
        flops = 6 * rows * d * i
        t_torch = time_ms(torch_call(layout, inputs))
        t_bf16 = time_ms(fused_call(layout, inputs, False, None))
        t_fp8 = time_ms(fused_call(layout, inputs, True, None))
        tf = [flops / t / 1e9 for t in (t_torch, t_bf16, t_fp8)]
        print(
            f"| {name} | {rows} | {t_torch:.3f} | {t_bf16:.3f} | {t_fp8:.3f} | {tf[0]:.0f} | {tf[1]:.0f} | "
            f"{tf[2]:.0f} | {t_torch / t_bf16:.2f}x |"
        )
        del inputs
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--budget-s", type=float, default=150.0, help="total tuning time")
    parser.add_argument("--dtypes", default="bf16,fp8", help="comma-separated: bf16, fp8")
    parser.add_argument(
        "--shapes", default="", help="tune only shapes whose name contains one of these (comma-separated)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "engine/kernels/fused_moe_configs.json",
    )
    args = parser.parse_args()
    if args.tune:
        tune(args.budget_s, args.out, tuple(args.dtypes.split(",")), args.shapes)
    if args.bench:
        bench()


if __name__ == "__main__":
    main()
