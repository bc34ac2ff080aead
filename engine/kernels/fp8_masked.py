"""FP8 rows in the masked expert layout (DeepEP low-latency dispatch): dequantise or quantise ONLY the valid
rows, in Triton, without a host synchronisation.

The masked layout is x [E, C, D] with `masked_m` [E] (device) valid rows per expert: rows [e, :masked_m[e]]
hold data, the rest is never read nor written. FP8 rows come with one float32 scale per row per group of
`group` columns, scales [E, C, D / group] with any strides (DeepEP's are column-major in the last two dims),
value = fp8 * scale (the format of `fp8_blocks`).

The grid is [E, cdiv(C, BLOCK_R)]; a program whose first row is at or past masked_m[e] exits at once, so the
work follows the rows that came, not the capacity. Users: the stand-in experts of the dispatcher checks and
benchmarks (`dequantize_masked`), and the fused MoE kernel's FP8 intermediate (`quantize_masked`).
Shape legend: E experts, C capacity per expert, D columns, G = D / group.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from moefleet.engine.kernels.fp8_blocks import FP8_DTYPE, FP8_MAX, SCALE_EPS

# The CPU interpreter rounds float -> e4m3 wrongly (fp8_quant): there quantised rows are written as float32
# and torch does the final cast.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_R = 16


@triton.jit
def _masked_rows_kernel(
    x_ptr,
    xs_ptr,
    y_ptr,
    ys_ptr,
    masked_m_ptr,
    D,
    stride_xe,
    stride_xm,
    stride_xk,
    stride_xse,
    stride_xsm,
    stride_xsk,
    stride_ye,
    stride_ym,
    stride_yse,
    stride_ysm,
    QUANT: tl.constexpr,  # False: y = x * scale; True: (y, ys) = per-group quantisation of x
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP8_MAX_C: tl.constexpr,
    EPS: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    valid = tl.load(masked_m_ptr + expert)
    if block * BLOCK_R >= valid:
        return
    offs_r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = offs_r < valid
    rows = offs_r.to(tl.int64)
    lane = tl.arange(0, BLOCK_G)
    x_rows = x_ptr + expert * stride_xe + rows * stride_xm
    y_rows = y_ptr + expert * stride_ye + rows * stride_ym
    for g in range(0, tl.cdiv(D, GROUP)):
        cols = g * GROUP + lane
        mask = row_mask[:, None] & ((lane < GROUP) & (cols < D))[None, :]
        x = tl.load(x_rows[:, None] + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if QUANT:
            scale = tl.maximum(tl.max(tl.abs(x), 1), EPS) / FP8_MAX_C
            q = tl.clamp(x / scale[:, None], -FP8_MAX_C, FP8_MAX_C)
            tl.store(y_rows[:, None] + cols[None, :], q.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(ys_ptr + expert * stride_yse + rows * stride_ysm + g, scale, mask=row_mask)
        else:
            s = tl.load(xs_ptr + expert * stride_xse + rows * stride_xsm + g * stride_xsk, mask=row_mask)
            tl.store(y_rows[:, None] + cols[None, :], (x * s[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, masked_m: torch.Tensor) -> None:
    if x.dim() != 3 or masked_m.shape != (x.shape[0],):
        raise ValueError(
            f"expected the masked layout x [E, C, D] with masked_m [E], got {tuple(x.shape)} and "
            f"{tuple(masked_m.shape)}"
        )


def _launch(
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    out: torch.Tensor,
    out_scales: torch.Tensor | None,
    masked_m: torch.Tensor,
    group: int,
) -> None:
    """One launch over [E, cdiv(C, BLOCK_R)]: dequantise (x_scales given) or quantise (out_scales given)."""
    num_experts, capacity, hidden = x.shape
    if not (num_experts and capacity and hidden):
        return
    _masked_rows_kernel[(num_experts, triton.cdiv(capacity, BLOCK_R))](
        x,
        x if x_scales is None else x_scales,
        out,
        out if out_scales is None else out_scales,
        masked_m.to(torch.int32),
        hidden,
        *x.stride(),
        *((0, 0, 0) if x_scales is None else x_scales.stride()),
        out.stride(0),
        out.stride(1),
        *((0, 0) if out_scales is None else (out_scales.stride(0), out_scales.stride(1))),
        QUANT=out_scales is not None,
        GROUP=group,
        BLOCK_G=triton.next_power_of_2(group),
        BLOCK_R=BLOCK_R,
        FP8_MAX_C=FP8_MAX,
        EPS=SCALE_EPS,
    )


def dequantize_masked(
    x: torch.Tensor, scales: torch.Tensor, masked_m: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """fp8 x [E, C, D] with scales [E, C, D / group] -> [E, C, D] in `out_dtype`: rows [e, :masked_m[e]]
    = x * scale per group; the other rows are left unwritten (their values are undefined)."""
    _check(x, masked_m)
    num_experts, capacity, hidden = x.shape
    if scales.shape[:2] != x.shape[:2] or hidden % scales.shape[2]:
        raise ValueError(
            f"scales {tuple(scales.shape)} do not match x {tuple(x.shape)} (one per row per group)"
        )
    group = hidden // scales.shape[2]
    out = torch.empty((num_experts, capacity, hidden), dtype=out_dtype, device=x.device)
    _launch(x, scales, out, None, masked_m, group)
    return out


def quantize_masked(x: torch.Tensor, masked_m: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [E, C, D] (bf16/fp16/fp32) -> (fp8 [E, C, D], float32 scales [E, C, ceil(D/group)], row-major):
    `quantize_per_token_group` on rows [e, :masked_m[e]] only; the other rows are left unwritten."""
    _check(x, masked_m)
    num_experts, capacity, hidden = x.shape
    groups = triton.cdiv(hidden, group)
    q = torch.empty(x.shape, dtype=torch.float32 if _INTERPRET else FP8_DTYPE, device=x.device)
    scales = torch.empty((num_experts, capacity, groups), dtype=torch.float32, device=x.device)
    _launch(x, None, q, scales, masked_m, group)
    return q.to(FP8_DTYPE), scales


def dequantize_masked_reference(
    x: torch.Tensor, scales: torch.Tensor, masked_m: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> list[torch.Tensor]:
    """The formula, per expert: [x[e, :m] * scale] for m = masked_m[e] (the tests' oracle)."""
    group = x.shape[2] // scales.shape[2]
    return [
        (x[e, :m].float() * scales[e, :m].float().repeat_interleave(group, 1)).to(out_dtype)
        for e, m in enumerate(masked_m.tolist())
    ]
