"""The per-expert cuBLAS FP8 experts with each expert's w2 GEMM written in place (`fp8_cublas.gemm_into`,
torch's out= overload) vs a new tensor and a row copy (the earlier path), DeepSeek-V3 width, one GPU.

    source benchmarks/device_setup.sh && python3 benchmarks/fp8_experts_into_probe.py
"""

from __future__ import annotations

import torch
import triton
from moefleet.engine.kernels import fp8_cublas
from moefleet.engine.kernels.fp8_blocks import quantize_weight_block

D, I = 7168, 2048  # noqa: E741


def main() -> None:
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, out= overload: {fp8_cublas._SCALED_MM_OUT}")
    print("| experts x rows | copy ms | in place ms | gain | bit-identical |")
    print("|---|---|---|---|---|")
    dev = torch.device("cuda", 0)
    available = fp8_cublas._SCALED_MM_OUT
    for experts, rows in [(9, 7282), (9, 14564), (4, 515)]:
        w13 = torch.randn(experts, 2 * I, D, device=dev, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(experts, D, I, device=dev, dtype=torch.bfloat16) * 0.02
        q13, s13 = quantize_weight_block(w13, (128, 128))
        q2, s2 = quantize_weight_block(w2, (128, 128))
        del w13, w2
        counts = [rows + (e % 3) for e in range(experts)]  # not all multiples of 4
        x = torch.randn(sum(counts) + 5, D, device=dev, dtype=torch.bfloat16)

        def run() -> torch.Tensor:
            return fp8_cublas.experts(x, counts, q13, q2, s13, s2)

        into = run()
        t_into = triton.testing.do_bench(run, warmup=3, rep=30)
        fp8_cublas._SCALED_MM_OUT = False
        copy = run()
        t_copy = triton.testing.do_bench(run, warmup=3, rep=30)
        fp8_cublas._SCALED_MM_OUT = available
        same = torch.equal(into, copy)
        print(f"| {experts} x {rows} | {t_copy:.3f} | {t_into:.3f} | {t_copy / t_into:.3f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
