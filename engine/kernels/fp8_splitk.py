"""Block-FP8 linears at decode size: a split-K Triton GEMM that keeps every SM streaming weights.

At decode the dense projections see few rows (M <= 256 per GPU, 128 per two-batch-overlap micro-batch), so a
GEMM is a weight stream: DeepSeek-V3's q_a_proj (1536 x 7168) holds 11 MB of fp8, 2.3 us at HBM speed, but
cuBLAS's blockwise kernel takes ~22 us at M = 256 (measured, docs/benchmarks.md): 12 x 2 output tiles leave
most of the 132 SMs idle while each tile walks all of K. Cutting K into `split` slices gives tiles x split
programs; each writes a float32 partial and one reduce launch sums them into the output dtype.

Data flow (x [M, K] bf16, W fp8 [N, K] with DeepSeek's scale_inv [N/128, K/128]):
    x --quantize_per_token_group (1 x 128 groups)--> xq fp8 [M, K], xs f32 [M, K/128]
      --_splitk_kernel grid (M tiles, N tiles, split)--> partial f32 [split, M, N]
      --_reduce_kernel--> y [M, N] (split 1: the GEMM writes y itself, no partials)
Each program accumulates, per 128-wide K block, dot(xq, Wq^T) x (row scale x tile scale): the same sum as
DeepSeek's reference w8a8 block GEMM. Row tiles are the fastest grid axis, so the programs that read one
weight tile run side by side and share it through L2.

`SplitKConfig` comes from `pick_config` (a measured table, `fp8_splitk_configs.py`, else a heuristic);
`Fp8Linear` (layers/linear.py) uses this path only for shapes the table marks as measured faster than cuBLAS
(`measured_faster`). Under TRITON_INTERPRET=1 (CPU tests) fp8 tiles are widened to float32 before the dot.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from moefleet.engine.kernels.fp8_splitk_configs import GROUP, SplitKConfig

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def k_blocks_per_split(k: int, split: int) -> int:
    """128-wide K blocks each slice walks (the last slice may walk fewer)."""
    return triton.cdiv(triton.cdiv(k, GROUP), split)


def effective_split(k: int, split: int) -> int:
    """Slices that hold at least one K block (a split larger than K's blocks is clamped)."""
    return triton.cdiv(triton.cdiv(k, GROUP), k_blocks_per_split(k, split))


@triton.jit
def _splitk_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cs,
    stride_cm,
    blocks_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    UPCAST: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, GROUP_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    as_rows = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_rows = bs_ptr + (offs_n // GROUP_K).to(tl.int64) * stride_bsn
    num_kb = tl.cdiv(K, GROUP_K)
    first = pid_k * blocks_per_split
    if SWAP_AB:  # C^T = W x^T: the weight's rows fill the MMA's 64-row side, the few tokens its narrow side
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, blocks_per_split):
        kb = first + i
        k = kb * GROUP_K + offs_k
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, GK]
        b = tl.load(b_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BN, GK]
        # The last slice may run past K's blocks: its a and b tiles load as zeros, and its scales are read
        # from the last real block (a valid address; the product is zero either way).
        kb_s = tl.minimum(kb, num_kb - 1)
        a_s = tl.load(as_rows + kb_s, mask=m_mask, other=0.0)
        b_s = tl.load(bs_rows + kb_s, mask=n_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SWAP_AB:
            acc_t += tl.dot(b, tl.trans(a)) * b_s[:, None] * a_s[None, :]
        else:
            acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    base = c_ptr + pid_k.to(tl.int64) * stride_cs
    if SWAP_AB:
        c = base + offs_m.to(tl.int64)[None, :] * stride_cm + offs_n[:, None]
        tl.store(c, acc_t.to(c_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
    else:
        c = base + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _reduce_kernel(p_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(p_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    config: SplitKConfig,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq fp8 [M, K] with row-major scales xs [M, K/128] @ W^T (fp8 [N, K], scale_inv [N/128, K/128]) ->
    [M, N] in `out_dtype`."""
    rows, k = xq.shape
    n = weight.shape[0]
    if weight.shape[1] != k or xs.shape != (rows, triton.cdiv(k, GROUP)):
        raise ValueError(
            f"split-K FP8 GEMM: x {tuple(xq.shape)} with scales {tuple(xs.shape)} does not match the weight "
            f"{tuple(weight.shape)} (activation scales must be [M, ceil(K/128)])"
        )
    if scale_inv.shape != (triton.cdiv(n, GROUP), triton.cdiv(k, GROUP)):
        raise ValueError(f"weight scales {tuple(scale_inv.shape)} are not 128 x 128 blocks of {(n, k)}")
    out = torch.empty((rows, n), dtype=out_dtype, device=xq.device)
    if rows == 0:
        return out
    split = effective_split(k, config.split)
    per = k_blocks_per_split(k, config.split)
    partial = out if split == 1 else torch.empty((split, rows, n), dtype=torch.float32, device=xq.device)
    grid = (triton.cdiv(rows, config.block_m), triton.cdiv(n, config.block_n), split)
    _splitk_kernel[grid](
        xq,
        xs,
        weight,
        scale_inv,
        partial,
        rows,
        n,
        k,
        xq.stride(0),
        xs.stride(0),
        weight.stride(0),
        scale_inv.stride(0),
        rows * n if split > 1 else 0,
        n,
        per,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        GROUP_K=GROUP,
        UPCAST=_INTERPRET,
        SWAP_AB=config.swap_ab,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(rows * n, block),)](partial, out, rows * n, SPLIT=split, BLOCK=block)
    return out


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    config: SplitKConfig,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [M, K] @ W^T for a block-FP8 weight, activations quantised per 1 x 128 group on the fly."""
    from moefleet.engine.kernels.fp8_quant import quantize_per_token_group

    if x.shape[0] == 0:
        return torch.empty((0, weight.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
    xq, xs = quantize_per_token_group(x.contiguous(), GROUP)
    return gemm(xq, xs, weight, scale_inv, config, out_dtype or x.dtype)
