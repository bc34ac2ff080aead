"""Block FP8 (e4m3) quantisation: activations per token per group of columns, on the fly, in Triton.

DeepSeek-V3/R1 and Kimi-K2 store a linear weight W [O, I] as float8_e4m3fn plus `weight_scale_inv`
[ceil(O/bo), ceil(I/bi)] (float32, one scale per bo x bi tile, 128x128 in the released checkpoints):
W = fp8 * scale tile-wise. The matching activation format (w8a8 block GEMMs) is x [M, K] as fp8 plus
one float32 scale per row per group of `group` columns: scale = amax(|x_group|) / 448, q = x / scale.
Shape legend: M rows, K columns, G = ceil(K / group) groups.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from moefleet.engine.kernels.fp8_blocks import (  # noqa: F401 (re-exported)
    FP8_DTYPE,
    FP8_MAX,
    SCALE_EPS,
    dequantize_block,
    quantize_per_token_group_reference,
    quantize_weight_block,
)

# The CPU interpreter rounds float -> e4m3 wrongly when the mantissa carries into the exponent (124.95 -> 64):
# there the kernel writes float32 values and torch does the final cast.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _quant_per_token_group_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    rows,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sg,
    swiglu_offset,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
    SWIGLU: tl.constexpr,
    FP8_MAX_C: tl.constexpr,
    EPS: tl.constexpr,
):
    """One row x GROUPS_PER_PROGRAM column groups per program (a [G, BLOCK] tile, amax per tile row).

    SWIGLU: the input row is [gate | up] (up at column offset `swiglu_offset`) and the quantised values are
    silu(gate) * up, rounded to x's dtype first (what the unfused torch SwiGLU would hand the next GEMM).
    Rows in [rows, grid rows) are padding: zeros with an all-zero group's scale (cuBLAS wants M padded to a
    multiple of 4)."""
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)  # [G]
    lane = tl.arange(0, BLOCK)  # [BLOCK]
    cols = group[:, None] * GROUP + lane[None, :]  # [G, BLOCK]
    valid_cols = tl.where(row < rows, K, 0)  # padding rows read nothing
    mask = (lane[None, :] < GROUP) & (cols < valid_cols)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0)
    if SWIGLU:
        up = tl.load(x_ptr + row * stride_xm + swiglu_offset + cols, mask=mask, other=0.0).to(tl.float32)
        gate = x.to(tl.float32)
        x = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32) * up
        x = x.to(x_ptr.dtype.element_ty)
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1), EPS) / FP8_MAX_C  # [G]
    q = tl.clamp(x / scale[:, None], -FP8_MAX_C, FP8_MAX_C)
    store_mask = (lane[None, :] < GROUP) & (cols < K)
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=store_mask)
    groups = tl.cdiv(K, GROUP)
    tl.store(s_ptr + row * stride_sm + group * stride_sg, scale, mask=group < groups)


def quantize_per_token_group(
    x: torch.Tensor,
    group: int,
    *,
    column_major_scales: bool = False,
    swiglu: bool = False,
    pad_rows_to: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32, last dim contiguous) -> (fp8 [M, K], float32 scales [M, ceil(K/group)]).

    `column_major_scales`: the scales tensor is [M, G] with strides (1, M) (each group's scales contiguous),
    the "outer-dim-major" layout cuBLAS's blockwise FP8 GEMM reads (`kernels.fp8_cublas`).
    `swiglu`: x is [M, 2K'] = [gate | up]; quantises silu(gate) * up ([M, K'] out), SwiGLU fused in.
    `pad_rows_to`: outputs have M rounded up to this multiple; the extra rows are zeros (scale EPS / 448)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected a 2-d row-major activation, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if swiglu:
        if cols % 2:
            raise ValueError(f"SwiGLU input [gate | up] needs an even width, got {cols}")
        cols //= 2
    padded = -(-rows // pad_rows_to) * pad_rows_to
    groups = triton.cdiv(cols, group)
    q = torch.empty((padded, cols), dtype=torch.float32 if _INTERPRET else FP8_DTYPE, device=x.device)
    if column_major_scales:
        scales = torch.empty((groups, padded), dtype=torch.float32, device=x.device).t()
    else:
        scales = torch.empty((padded, groups), dtype=torch.float32, device=x.device)
    per_program = min(8, triton.next_power_of_2(groups))
    if padded and cols:
        _quant_per_token_group_kernel[(padded, triton.cdiv(groups, per_program))](
            x,
            q,
            scales,
            rows,
            cols,
            x.stride(0),
            q.stride(0),
            scales.stride(0),
            scales.stride(1),
            cols,
            GROUP=group,
            BLOCK=triton.next_power_of_2(group),
            GROUPS_PER_PROGRAM=per_program,
            SWIGLU=swiglu,
            FP8_MAX_C=FP8_MAX,
            EPS=SCALE_EPS,
        )
    return q.to(FP8_DTYPE), scales
