"""Where a prefill experts stage spends its time on one GPU: host launch cost vs GPU time of the per-expert
cuBLAS blockwise FP8 path (`kernels.fp8_cublas.experts`), at a two-batch-overlap micro-batch and at a whole batch.

    source benchmarks/device_setup.sh && python3 benchmarks/prefill_experts_host_probe.py

Per (experts x rows per expert), milliseconds:
- gpu: the GPU-bound time (triton do_bench: the host runs ahead of the GPU);
- host: the host's time to launch the whole stage while the GPU is busy (queued behind a long GPU wait, so no
  launch blocks), and per expert; then the same for one launch of each part (quantise, scaled_mm, row copy);
- idle start: the wall time from an idle GPU (as when the host learns the counts only after the stream drained):
  host launch and GPU work then run in series for the first expert and overlap after.
If host per expert > gpu per expert, the stage is launch-bound and splitting it in two costs host time twice.
"""

from __future__ import annotations

import time

import torch
import triton
from moefleet.engine.kernels import fp8_cublas
from moefleet.engine.kernels.fp8_blocks import quantize_weight_block
from moefleet.engine.kernels.gpu_wait import gpu_wait

D, I = 7168, 2048  # noqa: E741 (DeepSeek-V3 hidden and expert intermediate sizes)
BLOCK = (128, 128)
BUSY_NS = 200_000_000  # 200 ms of GPU wait ahead of the launches being timed


def host_ms(fn, repeats: int = 3) -> float:
    """Host time of `fn`'s launches with the GPU busy ahead of them (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        gpu_wait(BUSY_NS)
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        torch.cuda.synchronize()
    return best * 1e3


def idle_start_ms(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    dev = torch.device("cuda", 0)
    print("| experts x rows | gpu ms | host ms (per expert) | idle start ms | host us: quantize / scaled_mm / "
          "swiglu quantize / row copy | stage ms alone / + 2.5 ms wait / + permute / + both (comm stream) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for experts, rows in [(9, 7282), (9, 14564), (4, 512)]:
        print(table_row(experts, rows, dev), flush=True)


def table_row(experts: int, rows: int, dev: torch.device) -> str:
    w13 = torch.randn(experts, 2 * I, D, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(experts, D, I, device=dev, dtype=torch.bfloat16) * 0.02
    q13, s13 = quantize_weight_block(w13, BLOCK)
    q2, s2 = quantize_weight_block(w2, BLOCK)
    del w13, w2
    x = torch.randn(experts * rows, D, device=dev, dtype=torch.bfloat16)
    host = [rows] * experts

    def stage() -> torch.Tensor:
        return fp8_cublas.experts(x, host, q13, q2, s13, s2)

    stage()
    gpu = triton.testing.do_bench(stage, warmup=3, rep=30)
    launch = host_ms(stage)
    idle = idle_start_ms(stage)
    part = x[:rows]
    xq, xs = fp8_cublas.quantize(part)
    gate_up = fp8_cublas.gemm(xq, xs, q13[0], s13[0], xq.shape[0], x.dtype)
    out = torch.empty_like(x)
    parts = [  # each part launched `experts` times in a row (warm), per launch
        host_ms(lambda: [fp8_cublas.quantize(part) for _ in range(experts)]) / experts,
        host_ms(lambda: [fp8_cublas.gemm(xq, xs, q13[0], s13[0], xq.shape[0], x.dtype) for _ in range(experts)])
        / experts,
        host_ms(lambda: [fp8_cublas.quantize(gate_up, swiglu=True) for _ in range(experts)]) / experts,
        host_ms(lambda: [out[:rows].copy_(part) for _ in range(experts)]) / experts,
    ]
    contention = contention_ms(stage, x, experts * rows)
    return (
        f"| {experts} x {rows} | {gpu:.2f} | {launch:.2f} ({launch / experts:.3f}) | {idle:.2f} | "
        + " / ".join(f"{p * 1e3:.0f}" for p in parts)
        + " | "
        + " / ".join(f"{c:.2f}" for c in contention)
        + " |"
    )


def contention_ms(stage, x: torch.Tensor, rows: int) -> list[float]:
    """The stage's GPU time (events on its stream) alone, then with a high-priority comm stream running
    (a) a 2.5 ms one-warp wait (the emulated transfer), (b) the dispatch's permute of `rows` rows (sort + gather,
    what the emulated dispatcher does for the other micro-batch), (c) both, launched just before the stage."""
    comm = torch.cuda.Stream(priority=-1)
    keys = torch.randint(0, 9, (rows,), device=x.device)
    source = x[: -(-rows // 8)].contiguous()

    def permute() -> None:
        order = torch.sort(keys, stable=True).indices
        source[order // 8]

    results = []
    for side in (None, lambda: gpu_wait(2_500_000), permute, lambda: (gpu_wait(2_500_000), permute())):
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            gpu_wait(5_000_000)  # the host queues everything before the GPU starts
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if side is not None:
                comm.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(comm):
                    side()
            stage()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end))
        results.append(best)
    return results


if __name__ == "__main__":
    main()
