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
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8_MAX_C: tl.constexpr,
    EPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    cols = group * GROUP + lane
    mask = (lane < GROUP) & (cols < K)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), EPS) / FP8_MAX_C
    q = tl.clamp(x / scale, -FP8_MAX_C, FP8_MAX_C)
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + group, scale)


def quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32, last dim contiguous) -> (fp8 [M, K], float32 scales [M, ceil(K/group)])."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected a 2-d row-major activation, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    groups = triton.cdiv(cols, group)
    q = torch.empty((rows, cols), dtype=torch.float32 if _INTERPRET else FP8_DTYPE, device=x.device)
    scales = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    if rows and cols:
        _quant_per_token_group_kernel[(rows, groups)](
            x,
            q,
            scales,
            cols,
            x.stride(0),
            q.stride(0),
            scales.stride(0),
            GROUP=group,
            BLOCK=triton.next_power_of_2(group),
            FP8_MAX_C=FP8_MAX,
            EPS=SCALE_EPS,
        )
    return q.to(FP8_DTYPE), scales
