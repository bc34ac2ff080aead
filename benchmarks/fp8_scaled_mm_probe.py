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
        xs = x.float().view(m, k // 128, 128).abs().amax(-1).clamp_min(1e-12) / 448.0  # [M, K/128]
        xq = (x.float().view(m, k // 128, 128) / xs[..., None]).view(m, k).to(torch.float8_e4m3fn)
        ws = w.float().view(n // 128, 128, k // 128, 128).abs().amax((1, 3)).clamp_min(1e-12) / 448.0
        wq = (
            (w.float().view(n // 128, 128, k // 128, 128) / ws[:, None, :, None])
            .view(n, k)
            .to(torch.float8_e4m3fn)
        )
        xs_t = xs.t().contiguous().t()  # outer-dim-major
        st = F.ScalingType

        def run() -> torch.Tensor:
            return F.scaled_mm(
                xq, wq.t(), xs_t, st.BlockWise1x128, ws.t(), st.BlockWise128x128, output_dtype=torch.bfloat16
            )

        ref = (xq.float().view(m, k // 128, 128) * xs[..., None]).view(m, k) @ (
            (wq.float().view(n // 128, 128, k // 128, 128) * ws[:, None, :, None]).view(n, k).t()
        )
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
