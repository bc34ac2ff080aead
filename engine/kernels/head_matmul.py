"""Per-head matmul: out[t, h, :] = x[t, h, :] @ W[h] for every head h (MLA's weight absorption in decode).

MLA decode multiplies each head's query by its own slice of kv_b_proj (q_nope [T, H, Dn] @ W_UK[h] [Dn, R]) and
each head's latent output by another (o_latent [T, H, R] @ W_UV[h]^T [R, Dv]). cuBLAS runs these as H batched
GEMMs of T rows with a short K (Dn = 128); measured on an H200 at H = 128 (benchmarks/mla_absorb.py): 27 us at
T = 64 where this kernel takes 14, 23 us at T = 256 where it takes 28 (so MLA uses it up to 128 tokens). Here one
program computes a [BLOCK_T, BLOCK_N] tile of one head, reading x
and W in place through their strides (W may be a transposed or split view of kv_b_proj's weight: no copies),
accumulating in float32.

Shapes: x [T, H, K] (any strides), w [H, K, N] (any strides), out [T, H, N] (allocated contiguous if not given).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .paged_attention import dot_precision


@triton.jit
def _head_matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    T,
    K,
    N,
    stride_xt,
    stride_xh,
    stride_xk,
    stride_wh,
    stride_wk,
    stride_wn,
    stride_ot,
    stride_oh,
    stride_on,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    x_rows = x_ptr + h * stride_xh + offs_t[:, None].to(tl.int64) * stride_xt
    w_cols = w_ptr + h * stride_wh + offs_n[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    out = out_ptr + h * stride_oh + offs_t[:, None].to(tl.int64) * stride_ot + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def head_matmul(
    x: Tensor, w: Tensor, *, out: Tensor | None = None, block: tuple[int, int, int] | None = None
) -> Tensor:
    """x [T, H, K] @ w [H, K, N] -> [T, H, N] per head (see the module docstring)."""
    if x.dim() != 3 or w.dim() != 3 or x.shape[1] != w.shape[0] or x.shape[2] != w.shape[1]:
        raise ValueError(
            f"head_matmul wants x [T, H, K] and w [H, K, N]; got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if x.dtype != w.dtype:
        raise ValueError(f"head_matmul wants x and w of one dtype, got {x.dtype} and {w.dtype}")
    tokens, heads, k = x.shape
    n = w.shape[2]
    if out is None:
        out = x.new_empty((tokens, heads, n))
    if tokens == 0 or heads == 0:
        return out
    if block is None:
        if x.is_cuda:
            block_t = 64 if tokens <= 64 else 128
            block = (block_t, 128, 64)
        else:
            block = (16, 16, 16)
    block_t, block_n, block_k = block
    grid = (heads, triton.cdiv(n, block_n), triton.cdiv(tokens, block_t))
    _head_matmul_kernel[grid](
        x, w, out, tokens, k, n,
        *x.stride(), *w.stride(), *out.stride(),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PREC=dot_precision(x.dtype),
        num_warps=4 if block_t <= 64 else 8, num_stages=3 if x.is_cuda else 1,
    )  # fmt: skip
    return out
