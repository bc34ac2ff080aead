"""Block-FP8 GEMMs on cuBLAS: torch's `F.scaled_mm` with DeepSeek's scaling (activations 1x128, weights 128x128).

Data flow (one linear, x [M, K] bf16, W fp8 [N, K] with scale_inv [N/128, K/128]):
    x --quantize (Triton, rows padded to 4)--> xq fp8 [M4, K], xs [M4, K/128] (strides (1, M4))
      --F.scaled_mm(xq, W^T, xs BlockWise1x128, scale_inv^T BlockWise128x128)--> y [M4, N] bf16 -> y[:M]
Experts (prefill, host row counts): per local expert with rows, quantise -> w13 GEMM -> SwiGLU fused into
the second quantisation -> w2 GEMM.

Measured on H200 (torch 2.11, cuBLAS of CUDA 13): 1,035-1,178 TFLOP/s against bf16 cuBLAS's 610-780 and our
Triton w8a8 kernel's ~480 (benchmarks/fp8_scaled_mm_probe.py, docs/benchmarks.md). Used where `device_ok` and
`shape_ok` say so (SM90, the API present, 128x128 blocks, K a multiple of 512); everything else keeps Triton.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

BLOCK = (128, 128)
# Compute capabilities where this path was measured and verified (H100/H200); others keep Triton.
VERIFIED_CAPABILITIES = ((9, 0),)


def api_present() -> bool:
    """torch exposes the blockwise scaled GEMM (`F.scaled_mm` + `F.ScalingType`; measured with torch 2.11)."""
    scaling = getattr(F, "ScalingType", None)
    return hasattr(F, "scaled_mm") and scaling is not None and hasattr(scaling, "BlockWise1x128")


def device_ok(device: torch.device) -> bool:
    """CUDA device of a verified compute capability, with the API present. No process-wide state: layers
    decide once and keep the answer (`Fp8Linear`), or ask per prefill step (`Experts.host_count_path`)."""
    return (
        device.type == "cuda"
        and api_present()
        and torch.cuda.get_device_capability(device) in VERIFIED_CAPABILITIES
    )


# torch wants the K/128 scale columns in whole groups of 4 (K = 256 failed: "scale_b must have shape 4 x 4").
K_MULTIPLE = 4 * BLOCK[1]


def shape_ok(out_features: int, in_features: int, block: Sequence[int]) -> bool:
    """cuBLAS's blockwise kernels want 128x128 weight tiles, K a multiple of 512 (every DeepSeek-V3 / Kimi-K2
    GEMM) and 16-byte rows (N a multiple of 16; a ragged last tile along N, kv_a_proj's 576, is accepted)."""
    return tuple(block) == BLOCK and in_features % K_MULTIPLE == 0 and out_features % 16 == 0


# torch's blockwise scaled GEMM with an out= overload (F.scaled_mm's op; measured with torch 2.11 on an H200)
_SCALED_MM_OUT = hasattr(torch, "_scaled_mm_v2") and hasattr(
    getattr(torch.ops.aten, "_scaled_mm_v2", None), "out"
)

# cuBLAS refuses blockwise FP8 GEMMs whose row count is not a multiple of 4 (measured: M = 1, 7, 4,097 fail,
# 100 passes); the activations are quantised into a buffer padded to this and the extra output rows dropped.
ROW_MULTIPLE = 4


def quantize(x: torch.Tensor, *, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M4, K], scales [M4, K/128] outer-dim-major), M4 = M rounded up to ROW_MULTIPLE.
    `swiglu`: x is [gate | up] and silu(gate) * up is quantised (one pass, no bf16 intermediate)."""
    from moefleet.engine.kernels.fp8_quant import quantize_per_token_group

    return quantize_per_token_group(
        x.contiguous(), BLOCK[1], column_major_scales=True, swiglu=swiglu, pad_rows_to=ROW_MULTIPLE
    )


def gemm(
    xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, rows: int, dtype
) -> torch.Tensor:
    """Quantised activations from `quantize` @ W^T -> [rows, N] (padding rows dropped)."""
    st = F.ScalingType  # type: ignore[attr-defined]
    out = F.scaled_mm(  # type: ignore[attr-defined]
        xq, weight.t(), xs, st.BlockWise1x128, scale_inv.t(), st.BlockWise128x128, output_dtype=dtype
    )
    return out if out.shape[0] == rows else out[:rows]


def linear(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x [M, K] @ W^T with W fp8 [N, K], scale_inv [N/128, K/128] float32 -> [M, N] in `out_dtype` (x's)."""
    rows = x.shape[0]
    dtype = out_dtype or x.dtype
    if rows == 0:
        return torch.empty((0, weight.shape[0]), dtype=dtype, device=x.device)
    xq, xs = quantize(x)
    return gemm(xq, xs, weight, scale_inv, rows, dtype)


def experts(
    hidden: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
) -> torch.Tensor:
    """hidden [N, D] grouped by local expert (host row counts) -> [N, D] unweighted SwiGLU expert outputs.

    w13 fp8 [E, 2I, D] (gate rows then up rows), w2 fp8 [E, D, I], scales [E, 2I/128, D/128] / [E, D/128,
    I/128]. Per expert with rows: quantise, w13 GEMM, SwiGLU fused into the second quantisation, w2 GEMM written
    in place into the output (`gemm_into`; no copy of each expert's rows, ~90 us per expert at 7k rows).
    Rows past sum(tokens_per_expert) (padding) come back as zeros."""

    def expert_rows(rows: torch.Tensor, expert: int, out: torch.Tensor) -> None:
        xq, xs = quantize(rows)
        gate_up = gemm(xq, xs, w13[expert], w13_scale[expert], xq.shape[0], hidden.dtype)
        aq, as_ = quantize(gate_up, swiglu=True)
        gemm_into(out, aq, as_, w2[expert], w2_scale[expert])

    return padded_expert_loop(hidden, tokens_per_expert, expert_rows)


def padded_expert_loop(
    hidden: torch.Tensor,
    tokens_per_expert: Sequence[int],
    expert_rows: Callable[[torch.Tensor, int, torch.Tensor], None],
) -> torch.Tensor:
    """Run `expert_rows(rows [c, D], expert, out [c4, N])` per expert with c > 0 rows, in order; it writes c4 =
    c rounded up to ROW_MULTIPLE rows of `out` (cuBLAS's padded M), the last c4 - c of them padding. Each
    expert's view starts at its first row, so its padding lands on the next expert's rows (which that expert
    then overwrites), on the zeroed tail, or on ROW_MULTIPLE spare rows past the end. Returns [N, N_out] with
    rows past sum(tokens_per_expert) zero."""
    valid = sum(tokens_per_expert)
    rows, width = hidden.shape[0], hidden.shape[1]
    out = torch.empty((rows + ROW_MULTIPLE, width), dtype=hidden.dtype, device=hidden.device)
    start = 0
    for expert, count in enumerate(tokens_per_expert):
        if count == 0:
            continue
        padded = -(-count // ROW_MULTIPLE) * ROW_MULTIPLE
        expert_rows(hidden[start : start + count], expert, out[start : start + padded])
        start += count
    out[valid:].zero_()  # after the loop: the last expert's padding rows may have landed there
    return out[:rows]


def gemm_into(
    out: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor
) -> None:
    """`gemm` of the padded rows [M4, K] written into `out` [M4, N] (contiguous rows) instead of a new tensor,
    through the out= overload of the op F.scaled_mm calls; where torch lacks it (or off CUDA), a GEMM and a copy."""
    if _SCALED_MM_OUT and out.is_cuda:
        st = F.ScalingType  # type: ignore[attr-defined]
        torch._scaled_mm_v2(  # type: ignore[attr-defined]
            xq,
            weight.t(),
            [xs],
            [st.BlockWise1x128.value],
            [],
            [scale_inv.t()],
            [st.BlockWise128x128.value],
            [],
            None,
            out.dtype,
            out=out,
        )
        return
    out.copy_(gemm(xq, xs, weight, scale_inv, xq.shape[0], out.dtype))
