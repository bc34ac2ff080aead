"""Activation quantisation cost alone (GPU time from torch.profiler and do_bench wall) at decode/prefill sizes,
and where a decode-sized cuBLAS FP8 linear's time goes (its host-side dispatch dominates eager wall time).

    python3 benchmarks/fp8_quant_probe.py    # one GPU, after `source benchmarks/device_setup.sh`

(The 2026-12-01 run also timed the previous one-group-per-program kernel, since replaced: docs/benchmarks.md.)
"""

from __future__ import annotations

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from moefleet.engine.kernels import fp8_cublas, fp8_quant  # noqa: E402
from moefleet.engine.kernels.fp8_blocks import quantize_weight_block  # noqa: E402


def kernel_us(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()) / reps


def main() -> None:
    print(f"# {torch.cuda.get_device_name(0)}")
    print("| what | rows x cols | do_bench us | kernel us (profiler) |")
    print("|---|---|---|---|")
    dev = torch.device("cuda", 0)
    for rows, cols in [(256, 7168), (256, 2048), (256, 16384), (16384, 7168)]:
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        cases = {
            "new, row-major": lambda: fp8_quant.quantize_per_token_group(x, 128),
            "new, column-major + pad 4": lambda: fp8_quant.quantize_per_token_group(
                x, 128, column_major_scales=True, pad_rows_to=4
            ),
        }
        for name, fn in cases.items():  # noqa: B023 (each case is timed before x changes)
            t = triton.testing.do_bench(fn) * 1e3
            print(f"| {name} | {rows} x {cols} | {t:.1f} | {kernel_us(fn):.1f} |")
    # the whole cuBLAS FP8 linear at decode size: where its time goes
    for n, k in [(1536, 7168), (7168, 16384)]:
        x = torch.randn(256, k, device=dev, dtype=torch.bfloat16)
        q, s = quantize_weight_block(torch.randn(n, k, device=dev) * 0.02, (128, 128))
        fn = lambda: fp8_cublas.linear(x, q, s)  # noqa: E731
        t = triton.testing.do_bench(fn) * 1e3
        print(f"| cuBLAS FP8 linear N={n} | 256 x {k} | {t:.1f} | {kernel_us(fn):.1f} |")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
