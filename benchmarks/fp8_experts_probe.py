"""Expert and projection GEMM paths side by side on one GPU (DeepSeek-V3 width), one table per question.

    PYTHONPATH=src python3 benchmarks/fp8_experts_probe.py

1. Experts (D 7168, I 2048, balanced rows): Triton fused bf16 / FP8 (device counts) vs cuBLAS blockwise FP8 per
   expert (host counts, `kernels.fp8_cublas.experts`) vs bf16 cuBLAS per expert vs torch._grouped_mm bf16.
2. Dense projections (DeepSeek-V3's linear shapes) at 256 and 16,384 rows: bf16 F.linear vs Triton w8a8 vs
   cuBLAS blockwise FP8 (`kernels.fp8_cublas.linear`).
3. Which shapes cuBLAS's blockwise FP8 GEMM accepts (odd M, N not a multiple of 128, sliced scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from moefleet.engine.kernels import fp8_cublas, grouped_mm
from moefleet.engine.kernels.fp8_blocks import quantize_weight_block
from moefleet.engine.kernels.fused_moe import fused_experts_grouped, w8a8_block_linear

D, I = 7168, 2048  # noqa: E741 (DeepSeek-V3 hidden and expert intermediate sizes)
BLOCK = (128, 128)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3


def experts_table() -> None:
    print("\n## Experts: microseconds per MoE layer (w13 + SwiGLU + w2), TFLOP/s in brackets")
    print("| experts x rows | Triton bf16 | Triton FP8 | cuBLAS FP8 per expert | cuBLAS bf16 per expert | "
          "torch._grouped_mm bf16 | FP8 rel err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    dev = torch.device("cuda", 0)
    for experts, rows in [(4, 512), (9, 1024), (9, 4096), (9, 14564)]:
        w13 = torch.randn(experts, 2 * I, D, device=dev, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(experts, D, I, device=dev, dtype=torch.bfloat16) * 0.02
        q13, s13 = quantize_weight_block(w13, BLOCK)
        q2, s2 = quantize_weight_block(w2, BLOCK)
        x = torch.randn(experts * rows, D, device=dev, dtype=torch.bfloat16)
        host = [rows] * experts
        counts = torch.tensor(host, dtype=torch.int32, device=dev)
        flops = 2 * experts * rows * 3 * D * I
        cells = []
        fns = {
            "triton_bf16": lambda: fused_experts_grouped(x, counts, w13, w2),
            "triton_fp8": lambda: fused_experts_grouped(
                x, counts, q13, q2, w13_scale=s13, w2_scale=s2, block_shape=BLOCK
            ),
            "cublas_fp8": lambda: fp8_cublas.experts(x, host, q13, q2, s13, s2),
            "cublas_bf16": lambda: _bf16_loop(x, host, w13, w2),
            "grouped_mm": lambda: grouped_mm.experts(x, counts, w13, w2),
        }
        for name, fn in fns.items():
            try:
                t = bench(fn)
                cells.append(f"{t:.0f} ({flops / t / 1e6:.0f})")
            except Exception as exc:  # an unavailable path is a table cell, not a crash
                cells.append(f"{type(exc).__name__}: {str(exc)[:60]}")
        ref = fns["triton_fp8"]().float()
        got = fns["cublas_fp8"]().float()
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"| {experts} x {rows} | " + " | ".join(cells) + f" | {err:.1e} |")


def _bf16_loop(x, host, w13, w2):
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(host):
        g, u = F.linear(x[start : start + n], w13[e]).chunk(2, -1)
        out[start : start + n] = F.linear(F.silu(g) * u, w2[e])
        start += n
    return out


def projections_table() -> None:
    print("\n## Dense projections: microseconds (TFLOP/s)")
    print("| name | M x N x K | bf16 F.linear | Triton w8a8 | cuBLAS FP8 | rel err cuBLAS vs Triton |")
    print("|---|---|---|---|---|---|")
    dev = torch.device("cuda", 0)
    shapes = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a(576->640 pad)": (640, 7168),
              "kv_b": (32768, 512), "o_proj": (7168, 16384), "shared w13": (4096, 7168),
              "shared w2": (7168, 2048)}  # fmt: skip
    for rows in (256, 16384):
        x_full = torch.randn(rows, 16384, device=dev, dtype=torch.bfloat16)
        for name, (n, k) in shapes.items():
            x = x_full[:, :k].contiguous()
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            q, s = quantize_weight_block(w, BLOCK)
            flops = 2 * rows * n * k
            t_bf16 = bench(lambda: F.linear(x, w))
            t_tri = bench(lambda: w8a8_block_linear(x, q, s, BLOCK))
            t_cub = bench(lambda: fp8_cublas.linear(x, q, s))
            ref = w8a8_block_linear(x, q, s, BLOCK).float()
            err = ((fp8_cublas.linear(x, q, s).float() - ref).norm() / ref.norm()).item()
            print(f"| {name} | {rows} x {n} x {k} | {t_bf16:.1f} ({flops / t_bf16 / 1e6:.0f}) | "
                  f"{t_tri:.1f} ({flops / t_tri / 1e6:.0f}) | {t_cub:.1f} ({flops / t_cub / 1e6:.0f}) | "
                  f"{err:.1e} |")  # fmt: skip


def limits_table() -> None:
    print("\n## cuBLAS blockwise FP8: accepted shapes")
    print("| M x N x K | result |")
    print("|---|---|")
    dev = torch.device("cuda", 0)
    for m, n, k in [(1, 1536, 7168), (7, 1536, 7168), (100, 1536, 7168), (4097, 1536, 7168),
                    (256, 576, 7168), (256, 1536, 7000)]:  # fmt: skip
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        q, s = quantize_weight_block(w, BLOCK)
        try:
            got = fp8_cublas.linear(x, q, s)
            result = f"ok {tuple(got.shape)}" if got.shape == (m, n) else f"wrong shape {tuple(got.shape)}"
        except Exception as exc:
            result = f"{type(exc).__name__}: {str(exc)[:100]}"
        print(f"| {m} x {n} x {k} | {result} |")
    # Sliced scales: one quantisation of all rows, then a row slice per expert (strides (1, M_total)).
    from moefleet.engine.kernels.fp8_quant import quantize_per_token_group

    x = torch.randn(1024, 7168, device=dev, dtype=torch.bfloat16)
    w = torch.randn(1536, 7168, device=dev, dtype=torch.bfloat16) * 0.02
    q, s = quantize_weight_block(w, BLOCK)
    xq, xs = quantize_per_token_group(x, 128, column_major_scales=True)
    st = F.ScalingType
    try:
        part = F.scaled_mm(xq[256:512], q.t(), xs[256:512], st.BlockWise1x128, s.t(), st.BlockWise128x128,
                           output_dtype=torch.bfloat16)  # fmt: skip
        full = fp8_cublas.linear(x, q, s)
        print(f"| sliced scales rows 256:512 | ok, max diff vs whole {(part - full[256:512]).abs().max().item():.2e} |")
    except Exception as exc:
        print(f"| sliced scales rows 256:512 | {type(exc).__name__}: {str(exc)[:100]} |")


def main() -> None:
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    limits_table()
    experts_table()
    projections_table()


if __name__ == "__main__":
    main()
