"""Fused rotary embedding on the GPU: one kernel per tensor instead of seven (two half loads, four products,
a difference, a sum and a concatenation). The rotation is computed in float32 and rounded once to the
output dtype, so in bf16 it is at least as accurate as the reference formula (engine/layers/rotary.py,
Hugging Face's), which rounds each product to bf16 and then the difference / sum again; the two are not
bit-identical in bf16 (tests/gpu/test_fused_elementwise_gpu.py checks the accuracy bound). In float32 the
kernel may contract a product and a difference into one FMA (Triton's default), within 1 ulp of torch.

x [T, H, R] (rows may be strided: per-head views of a projection, MLA's rope slice), cos/sin [T, R/2]
(contiguous, computed once per step). Non-interleaved (NeoX halves) or interleaved (pairs (x0, x1), ...);
the output is always [rotated first halves | rotated second halves], contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    x_token_stride,
    x_head_stride,
    heads,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    token = row // heads
    head = row % heads
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    base = x_ptr + token * x_token_stride + head * x_head_stride
    if INTERLEAVED:
        x1 = tl.load(base + 2 * i, mask=mask, other=0.0)
        x2 = tl.load(base + 2 * i + 1, mask=mask, other=0.0)
    else:
        x1 = tl.load(base + i, mask=mask, other=0.0)
        x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
    c = tl.load(cos_ptr + token * HALF + i, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + token * HALF + i, mask=mask, other=0.0).to(tl.float32)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # float32 products and sums, one explicit round-to-nearest-even into the output dtype
    out = out_ptr + row * (2 * HALF)
    tl.store(out + i, (a1 * c - a2 * s).to(dt, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(out + HALF + i, (a2 * c + a1 * s).to(dt, fp_downcast_rounding="rtne"), mask=mask)


def fused_rotary_supported(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """CUDA, x [T, H, R] with a unit last-dim stride, cos [T, R/2] contiguous and of x's dtype."""
    return (
        x.is_cuda
        and x.dim() == 3
        and x.stride(-1) == 1
        and cos.dim() == 2
        and cos.is_contiguous()
        and cos.dtype == x.dtype
        and cos.shape == (x.shape[0], x.shape[-1] // 2)
    )


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The rotary embedding of x [T, H, R] by cos/sin [T, R/2]; a new contiguous [T, H, R] tensor."""
    tokens, heads, dim = x.shape
    if dim % 2 or cos.shape != (tokens, dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"want x [T, H, R] with R even and cos/sin [T, R/2]; got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")  # fmt: skip
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = dim // 2
    _rotary_kernel[(tokens * heads,)](
        x,
        cos,
        sin.contiguous(),
        out,
        x.stride(0),
        x.stride(1),
        heads,
        HALF=half,
        BLOCK=triton.next_power_of_2(half),
        INTERLEAVED=interleaved,
        num_warps=1 if half <= 64 else 2,
    )
    return out
