"""Is cuBLAS's blockwise FP8 GEMM (DeepSeek's 1x128 activation / 128x128 weight scales) usable here, and how fast?

    python3 benchmarks/fp8_scaled_mm_probe.py    # one GPU; prints one table row per shape

bf16 `F.linear` (cuBLAS) vs `torch.nn.functional.scaled_mm` with ScalingType.BlockWise1x128 (activations,
scales [M, K/128] outer-dim-major) x BlockWise128x128 (weight, scales [N/128, K/128] passed transposed), M, N, K
multiples of 128 here; rel error vs the dequantised bf16 product. A missing API or a refused call prints the reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from moefleet.engine.kernels.fp8_blocks import (
    dequantize_block,
    quantize_per_token_group_reference,
    quantize_weight_block,
)


def main() -> None:
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| M x N x K | bf16 F.linear us | TFLOP/s | FP8 blockwise us | TFLOP/s | rel err | note |")
    print("|---|---|---|---|---|---|---|")
    for m, n, k in [(16384, 4096, 7168), (16384, 7168, 2048), (16384, 24576, 1536), (16384, 7168, 16384),
                    (256, 7168, 16384), (256, 24576, 1536)]:  # fmt: skip
        print(_row(m, n, k))


def _row(m: int, n: int, k: int) -> str:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    flops = 2 * m * n * k
    t_bf16 = triton.testing.do_bench(lambda: F.linear(x, w)) * 1e3
    note, t_fp8, err = "", float("nan"), float("nan")
    try:
        xq, xs = quantize_per_token_group_reference(x, 128)  # xs [M, K/128]
        wq, ws = quantize_weight_block(w, (128, 128))  # ws [N/128, K/128]
        xs_t = xs.t().contiguous().t()  # outer-dim-major
        st = F.ScalingType

        def run() -> torch.Tensor:
            return F.scaled_mm(
                xq, wq.t(), xs_t, st.BlockWise1x128, ws.t(), st.BlockWise128x128, output_dtype=torch.bfloat16
            )

        ref = (xq.float() * xs.repeat_interleave(128, 1)) @ dequantize_block(wq, ws, (128, 128)).t()
        got = run().float()
        err = ((got - ref).norm() / ref.norm()).item()
        t_fp8 = triton.testing.do_bench(run) * 1e3
    except Exception as exc:  # a missing API or a refused layout is the answer, not a crash
        note = f"{type(exc).__name__}: {str(exc)[:120]}"
    return (
        f"| {m} x {n} x {k} | {t_bf16:.1f} | {flops / t_bf16 / 1e6:.0f} | {t_fp8:.1f} | "
        f"{flops / t_fp8 / 1e6:.0f} | {err:.2e} | {note} |"
    )


if __name__ == "__main__":
    main()
