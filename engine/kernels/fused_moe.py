"""Fused MoE expert computation in Triton: grouped gate/up GEMM with SiLU(gate)*up in the epilogue, then
the grouped down GEMM (optionally times the routing weight), over rows aligned per expert on the device.

Three layouts, one GEMM kernel:
- `fused_experts_topk`: tokens [T, D] with local expert ids [T, K] (-1 = another rank's expert) and routing
  weights; returns sum_k weight * expert(x) in token order [T, D]. Unused hits contribute zero.
- `fused_experts_grouped`: rows [N, D] already grouped by local expert (the dispatcher's layout) with
  `counts` [E] in device memory; returns unweighted outputs [N, D] in the same order.
- `fused_experts_masked`: the low-latency dispatch layout x [E, C, D] with valid rows `masked_m` [E] per
  expert (DeepEP low-latency output); returns [E, C, D]; rows at or past masked_m[e] are neither read nor
  written. x may be FP8 as DeepEP delivers it, with per-row per-128-column scales [E, C, D/128] (any strides):
  dequantised inside the GEMM (see "FP8" below). Each expert gets a host-chosen number of row-block programs
  (from `expected_rows`), each looping over its share of the rows below masked_m[e].
The launch grid depends only on shapes (worst case: every expert's last block ragged), blocks past the
padded total read from device memory exit at once: no host synchronisation, CUDA-graph capturable.

FP8 (w8a8, DeepSeek's block format): weights float8_e4m3fn [E, O, I] with `scale_inv` [E, O/bo, I/bi]
(bo x bi = 128 x 128 in released checkpoints); activations are quantised per row per group of bi columns by
`fp8_quant.quantize_per_token_group` just before each GEMM; each K tile's partial product is scaled by the
row's activation scale times the column's weight-tile scale. FP8 rows that arrive with their scales (masked
mode) skip that quantisation; against bf16/fp32 weights each fp8 tile is widened (exact) and its partial
product multiplied by the row's scale. The FP8 intermediate of masked mode is quantised on valid rows only
(`fp8_masked.quantize_masked`).
Shape legend: T tokens, K top-k (`top_k`), N rows, E local experts, C capacity per expert, D hidden,
I expert intermediate size; w13 [E, 2I, D] (gate rows :I, up rows I:), w2 [E, D, I].
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from moefleet.engine.kernels.fp8_masked import quantize_masked
from moefleet.engine.kernels.fp8_quant import FP8_DTYPE, quantize_per_token_group
from moefleet.engine.kernels.fused_moe_configs import MoEConfig, pick_config
from moefleet.engine.kernels.moe_align import AlignedRows, align_grouped, align_topk

# The CPU interpreter cannot multiply fp8 (nor bf16) tiles: there fp8 tiles are widened to float32 first
# (on GPUs, to bf16 when the FP8 group is narrower than the 32-wide K of fp8 MMAs: tiny test models)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    weight_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    masked_m_ptr,
    N,
    K,
    num_rows,  # sorted mode: the sentinel row id; masked mode: capacity C per expert
    up_offset,  # SWIGLU: row of b where the up projection starts (= N)
    stride_ae,  # masked mode: a's stride between experts (rows of a are [e, m]; stride_ase: a_scale's)
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_ase,
    stride_asm,
    stride_ask,
    stride_bse,
    stride_bsn,
    stride_bsk,
    A_ROW_DIV: tl.constexpr,
    MASKED: tl.constexpr,
    SWIGLU: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    FP8: tl.constexpr,  # fp8 weights (w8a8): a is fp8 too, both scaled per K group
    A_FP8: tl.constexpr,  # fp8 activations with per-row per-A_GROUP_K scales against bf16/fp32 weights
    UPCAST_FP8: tl.constexpr,
    UPCAST_TYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    A_GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    # grouped ordering: GROUP_M row blocks share the weight columns they read (L2 reuse)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows

    if MASKED:
        # program (pid_m, expert) takes row blocks pid_m, pid_m + num_pid_m, ... below masked_m[expert]: the
        # grid is sized from the expected rows, the loop from the rows that came (device memory, no sync)
        expert = tl.program_id(1)
        valid = tl.load(masked_m_ptr + expert)
        num_iters = tl.cdiv(valid - pid_m * BLOCK_M, num_pid_m * BLOCK_M)
    else:
        valid = 0
        expert = tl.load(expert_ids_ptr + pid_m)  # pid_m < the grid's blocks: in bounds even when unused
        num_iters = tl.where(pid_m * BLOCK_M < tl.load(num_padded_ptr), 1, 0)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    for it in range(0, num_iters):
        offs_m = (pid_m + it * num_pid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        if MASKED:
            row_mask = offs_m < valid
            rows = expert.to(tl.int64) * num_rows + offs_m
            a_base = a_ptr + expert.to(tl.int64) * stride_ae + offs_m.to(tl.int64) * stride_am
            as_rows = a_scale_ptr + expert.to(tl.int64) * stride_ase + offs_m.to(tl.int64) * stride_asm
        else:
            ids = tl.load(sorted_ids_ptr + offs_m)
            row_mask = ids < num_rows
            rows = ids.to(tl.int64)
            a_base = a_ptr + (rows // A_ROW_DIV) * stride_am
            as_rows = a_scale_ptr + (rows // A_ROW_DIV) * stride_asm
        a_ptrs = a_base[:, None] + offs_k[None, :] * stride_ak
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        b_ptrs = b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
        if SWIGLU:
            u_ptrs = b_base + (offs_n[None, :] + up_offset) * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FP8:
            bs_base = b_scale_ptr + expert.to(tl.int64) * stride_bse
            bs_ptrs = bs_base + (offs_n // GROUP_N) * stride_bsn
            if SWIGLU:
                us_ptrs = bs_base + ((offs_n + up_offset) // GROUP_N) * stride_bsn

        for k_tile in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k_tile * BLOCK_K
            k_mask = offs_k < k_left
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if SWIGLU:
                u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP8 or A_FP8:
                a_s = tl.load(
                    as_rows + ((k_tile * BLOCK_K) // A_GROUP_K) * stride_ask, mask=row_mask, other=0.0
                )
            if FP8:
                if UPCAST_FP8:
                    a = a.to(UPCAST_TYPE)
                    b = b.to(UPCAST_TYPE)
                    if SWIGLU:
                        u = u.to(UPCAST_TYPE)
                k_group = (k_tile * BLOCK_K) // GROUP_K
                b_s = tl.load(bs_ptrs + k_group * stride_bsk, mask=n_mask, other=0.0)
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
                if SWIGLU:
                    u_s = tl.load(us_ptrs + k_group * stride_bsk, mask=n_mask, other=0.0)
                    acc_up += tl.dot(a, u) * a_s[:, None] * u_s[None, :]
            elif A_FP8:
                # dequantise the activation tile: e4m3 values are exact in the weights' dtype, the row's
                # scale multiplies the tile's partial product (one scale per row per K group)
                a = a.to(b.dtype)
                acc += tl.dot(a, b, input_precision=DOT_PRECISION) * a_s[:, None]
                if SWIGLU:
                    acc_up += tl.dot(a, u, input_precision=DOT_PRECISION) * a_s[:, None]
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
                if SWIGLU:
                    acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
            if SWIGLU:
                u_ptrs += BLOCK_K * stride_bk

        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        if MUL_WEIGHT:
            w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            acc = acc * w[:, None]
        c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _check_weights(w13, w2, w13_scale, w2_scale, block_shape):
    num_experts, two_inter, hidden = w13.shape
    if w2.shape != (num_experts, hidden, two_inter // 2) or two_inter % 2:
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} are not [E, 2I, D] and [E, D, I]")
    fp8 = w13.dtype == FP8_DTYPE
    if fp8 != (w2.dtype == FP8_DTYPE) or fp8 != (w13_scale is not None) or fp8 != (w2_scale is not None):
        raise ValueError("FP8 experts need both weights in float8_e4m3fn and both scales")
    if fp8 and block_shape is None:
        raise ValueError("FP8 experts need block_shape (the checkpoint's weight_block_size)")
    if fp8 and (two_inter // 2) % block_shape[0]:
        raise ValueError(
            f"intermediate size {two_inter // 2} must be a multiple of the FP8 block rows {block_shape[0]} "
            "(gate and up halves of w13 must not share a scale tile)"
        )
    return fp8


def _strides3(t: torch.Tensor | None, masked: bool, capacity: int) -> tuple[int, int, int]:
    """(expert, row, column) strides of an activation or its scales: [E, C, X] as given, [E*C, X] flat
    (masked: expert stride C rows), absent: zeros."""
    if t is None:
        return 0, 0, 0
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    return (capacity * t.stride(0) if masked else 0), t.stride(0), t.stride(1)


def _gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    out: torch.Tensor,
    *,
    n: int,
    config: MoEConfig,
    block_shape: tuple[int, int] | None,
    aligned: AlignedRows | None = None,
    masked_m: torch.Tensor | None = None,
    capacity: int = 0,
    m_blocks: int | None = None,
    a_group: int | None = None,
    a_row_div: int = 1,
    swiglu: bool = False,
    weights: torch.Tensor | None = None,
) -> None:
    """One grouped GEMM. `a` [rows, K] (or [E, C, K] in masked mode, any strides); fp8 `a` comes with
    `a_scale` [rows (or E, C), K / a_group] (any strides: DeepEP's are column-major). Masked mode: `m_blocks`
    row-block programs per expert (default: enough for C rows), each looping over its share of the rows
    below masked_m[e]."""
    k = a.shape[-1]
    fp8 = b.dtype == FP8_DTYPE
    a_fp8 = a.dtype == FP8_DTYPE
    if a_fp8 != (a_scale is not None):
        raise ValueError("fp8 activations need their scales (and only fp8 activations have scales)")
    if fp8 and not a_fp8:
        raise ValueError("FP8 weights need fp8 activations with scales")
    block_k = config.block_k
    a_group = a_group or (block_shape[1] if fp8 and block_shape else k)
    if fp8:
        assert block_shape is not None
        block_k = min(block_k, block_shape[1])
        if block_shape[1] % block_k:
            raise ValueError(f"BLOCK_K {block_k} must divide the FP8 group {block_shape[1]}")
    if a_fp8:
        block_k = min(block_k, a_group)
        if a_group % block_k:
            raise ValueError(f"BLOCK_K {block_k} must divide the activation scale group {a_group}")
    num_n = triton.cdiv(n, config.block_n)
    masked = masked_m is not None
    if masked:
        assert masked_m is not None
        full = triton.cdiv(capacity, config.block_m)
        grid = (max(1, min(m_blocks or full, full)) * num_n if full else 0, masked_m.shape[0])
        num_rows = capacity
    else:
        assert aligned is not None
        grid = (aligned.max_blocks * num_n, 1)
        num_rows = aligned.num_rows
    if grid[0] == 0 or grid[1] == 0:
        return
    dummy = out
    a_s = a_scale if a_scale is not None else dummy
    b_s = b_scale if b_scale is not None else dummy
    stride_ae, stride_am, stride_ak = _strides3(a, masked, capacity)
    stride_ase, stride_asm, stride_ask = _strides3(a_scale, masked, capacity)
    if a_scale is not None and a.dim() != a_scale.dim():
        raise ValueError("masked activations and their scales must both be [E, C, X] or both flat")
    _moe_gemm_kernel[grid](
        a,
        b,
        out,
        a_s,
        b_s,
        weights if weights is not None else dummy,
        aligned.sorted_ids if aligned is not None else dummy,
        aligned.expert_ids if aligned is not None else dummy,
        aligned.num_padded if aligned is not None else dummy,
        masked_m if masked_m is not None else dummy,
        n,
        k,
        num_rows,
        n,
        stride_ae,
        stride_am,
        stride_ak,
        b.stride(0),
        b.stride(1),
        b.stride(2),
        out.stride(0),
        out.stride(1),
        stride_ase,
        stride_asm,
        stride_ask,
        b_s.stride(0) if b_scale is not None else 0,
        b_s.stride(1) if b_scale is not None else 0,
        b_s.stride(2) if b_scale is not None else 0,
        A_ROW_DIV=a_row_div,
        MASKED=masked,
        SWIGLU=swiglu,
        MUL_WEIGHT=weights is not None,
        FP8=fp8,
        A_FP8=a_fp8 and not fp8,
        UPCAST_FP8=fp8 and (_INTERPRET or block_k < 32),  # fp8 MMAs need K tiles of 32
        UPCAST_TYPE=tl.float32 if _INTERPRET else tl.bfloat16,  # bf16 holds every e4m3 value exactly
        DOT_PRECISION="ieee" if b.dtype == torch.float32 else "tf32",  # float32 stays float32 (no TF32)
        GROUP_N=block_shape[0] if block_shape else 1,
        GROUP_K=block_shape[1] if block_shape else 1,
        A_GROUP_K=a_group,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _maybe_quant(x: torch.Tensor, fp8: bool, block_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not fp8:
        return x, None
    return quantize_per_token_group(x, block_shape[1])


def _two_gemms(
    hidden,
    aligned_or_masked,
    w13,
    w2,
    w13_scale,
    w2_scale,
    block_shape,
    config,
    a_row_div,
    weights,
    out,
    rows,
    hidden_scale=None,
    m_blocks=None,
):
    """gate/up (+SiLU*up) into an intermediate [rows, I], then down into `out`. `hidden` arrives either in
    the activation dtype (quantised here for FP8 weights) or as fp8 with `hidden_scale` (masked mode:
    DeepEP's low-latency rows, [E, C, D] with scales [E, C, D/128], used as they are)."""
    fp8 = w13.dtype == FP8_DTYPE
    inter = w13.shape[1] // 2
    act_dtype = out.dtype
    aligned, masked_m, capacity = aligned_or_masked
    mid = torch.empty((rows, inter), dtype=act_dtype, device=hidden.device)
    a_group = None
    if hidden_scale is not None:
        a, a_s = hidden, hidden_scale
        a_group = hidden.shape[-1] // hidden_scale.shape[-1]
    else:
        a, a_s = _maybe_quant(hidden, fp8, block_shape)
    common = dict(
        config=config,
        block_shape=block_shape,
        aligned=aligned,
        masked_m=masked_m,
        capacity=capacity,
        m_blocks=m_blocks,
    )
    _gemm(a, a_s, w13, w13_scale, mid, n=inter, a_group=a_group, a_row_div=a_row_div, swiglu=True, **common)  # type: ignore[arg-type]
    if fp8 and masked_m is not None:  # quantise only the rows below masked_m (the rest was never written)
        m3, s3 = quantize_masked(mid.view(-1, capacity, inter), masked_m, block_shape[1])
        m, m_s = m3.view(rows, inter), s3.view(rows, -1)
    else:
        m, m_s = _maybe_quant(mid, fp8, block_shape)
    _gemm(m, m_s, w2, w2_scale, out, n=w2.shape[1], weights=weights, **common)  # type: ignore[arg-type]


def fused_experts_topk(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """hidden [T, D], topk_ids [T, K] local ids (-1: not here), topk_weights [T, K] -> [T, D] in token order.

    Without weights every hit counts 1 (the sum of the K experts' outputs)."""
    fp8 = _check_weights(w13, w2, w13_scale, w2_scale, block_shape)
    tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    config = config or pick_config(num_experts, w13.shape[1] // 2, w13.shape[2], tokens * top_k, fp8)
    aligned = align_topk(topk_ids, num_experts, config.block_m)
    hits = torch.zeros((tokens * top_k, w2.shape[1]), dtype=hidden.dtype, device=hidden.device)
    weights = topk_weights.reshape(-1).float().contiguous() if topk_weights is not None else None
    _two_gemms(
        hidden.contiguous(),
        (aligned, None, 0),
        w13,
        w2,
        w13_scale,
        w2_scale,
        block_shape,
        config,
        top_k,
        weights,
        hits,
        tokens * top_k,
    )
    return hits.view(tokens, top_k, w2.shape[1]).sum(dim=1, dtype=torch.float32).to(hidden.dtype)


def fused_experts_grouped(
    hidden: torch.Tensor,
    counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """hidden [N, D] grouped by expert, counts [E] (device) -> unweighted expert outputs [N, D]."""
    fp8 = _check_weights(w13, w2, w13_scale, w2_scale, block_shape)
    rows = hidden.shape[0]
    num_experts = w13.shape[0]
    config = config or pick_config(num_experts, w13.shape[1] // 2, w13.shape[2], rows, fp8)
    aligned = align_grouped(counts, rows, config.block_m)
    out = torch.empty_like(hidden)
    _two_gemms(
        hidden.contiguous(),
        (aligned, None, 0),
        w13,
        w2,
        w13_scale,
        w2_scale,
        block_shape,
        config,
        1,
        None,
        out,
        rows,
    )
    return out


def fused_experts_masked(
    x: torch.Tensor,
    masked_m: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    config: MoEConfig | None = None,
    expected_rows: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [E, C, D], masked_m [E] valid rows per expert (device) -> [E, C, D] (rows >= masked_m[e] unwritten).

    x may be float8_e4m3fn with `x_scale` [E, C, D / group] (one float32 per row per group, any strides:
    DeepEP low-latency's column-major scales as they come): the rows are used as they are, dequantised
    inside the GEMM (bf16/fp32 weights: each K tile's partial product times the row's scale; FP8 weights:
    w8a8 with both scales). Nothing past masked_m[e] is read. The output (and the intermediate) is
    `out_dtype`; default: x's dtype, for fp8 x the weights' (bfloat16 for FP8 weights). `expected_rows` (rows over all experts, a host-side guess such as tokens x top-k)
    picks the block config and how many row-block programs each expert gets; more rows than expected are
    still computed (each program loops), fewer leave programs idle. Default: the capacity."""
    fp8 = _check_weights(w13, w2, w13_scale, w2_scale, block_shape)
    num_experts, capacity, hidden = x.shape
    if num_experts != w13.shape[0]:
        raise ValueError(f"x has {num_experts} experts, weights have {w13.shape[0]}")
    if (x.dtype == FP8_DTYPE) != (x_scale is not None):
        raise ValueError("float8_e4m3fn activations need x_scale [E, C, D / group] (and only they take one)")
    if x_scale is not None and (x_scale.shape[:2] != x.shape[:2] or hidden % x_scale.shape[2]):
        raise ValueError(
            f"x_scale {tuple(x_scale.shape)} is not one scale per row per group of x {tuple(x.shape)}"
        )
    expected = min(expected_rows or num_experts * capacity, num_experts * capacity)
    config = config or pick_config(num_experts, w13.shape[1] // 2, hidden, max(expected, 1), fp8)
    # twice the expected rows per expert, in row blocks: headroom for imbalance without idle programs
    m_blocks = triton.cdiv(2 * triton.cdiv(expected, num_experts), config.block_m) if expected_rows else None
    if out_dtype is None:  # fp8 rows: the weights' dtype (bf16 for FP8 weights), else x's
        out_dtype = x.dtype if x.dtype != FP8_DTYPE else (torch.bfloat16 if fp8 else w13.dtype)
    if fp8 and x_scale is None and block_shape is not None:
        # real-valued rows for FP8 weights: quantise the valid rows only (the buffer's other rows may be many
        # times more: capacity = ranks x tokens per local expert), then the FP8-row path below
        x, x_scale = quantize_masked(x, masked_m.to(torch.int32), block_shape[1])
    out = torch.empty((num_experts * capacity, hidden), dtype=out_dtype, device=x.device)
    _two_gemms(
        x if x_scale is not None else x.reshape(num_experts * capacity, hidden).contiguous(),
        (None, masked_m.to(torch.int32).contiguous(), capacity),
        w13,
        w2,
        w13_scale,
        w2_scale,
        block_shape,
        config,
        1,
        None,
        out,
        num_experts * capacity,
        hidden_scale=x_scale,
        m_blocks=m_blocks,
    )
    return out.view(num_experts, capacity, hidden)


# ---- torch references (slow, straight from the formula; the CPU tests' oracles) ----


def expert_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert in float32: w2 @ (silu(gate @ x) * (up @ x)) for rows x [M, D]."""
    inter = w13.shape[0] // 2
    x32 = x.float()
    gate = x32 @ w13[:inter].float().T
    up = x32 @ w13[inter:].float().T
    return (F.silu(gate) * up) @ w2.float().T


def experts_reference_topk(hidden, w13, w2, topk_ids, topk_weights) -> torch.Tensor:
    """float32 [T, D]: sum over hits with a local expert of weight * expert(token)."""
    out = torch.zeros(hidden.shape[0], w2.shape[1], dtype=torch.float32)
    for t in range(topk_ids.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            w = 1.0 if topk_weights is None else float(topk_weights[t, k])
            out[t] += w * expert_reference(hidden[t : t + 1].cpu(), w13[e].cpu(), w2[e].cpu())[0]
    return out


def w8a8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_shape: tuple[int, int],
    out_dtype: torch.dtype | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Dense FP8 linear: x [M, K] (quantised per token group on the fly) @ W^T, W fp8 [N, K] with block
    scale_inv [N/bn, K/bk] -> [M, N] in `out_dtype` (x's by default). The same GEMM kernel as the experts,
    run as one expert whose valid rows are all M."""
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty((rows, n), dtype=out_dtype or x.dtype, device=x.device)
    if rows == 0:
        return out
    config = config or pick_config(1, n, k, rows, True)
    a, a_s = quantize_per_token_group(x.contiguous(), block_shape[1])
    valid = torch.full((1,), rows, dtype=torch.int32, device=x.device)
    _gemm(
        a,
        a_s,
        weight.unsqueeze(0),
        scale_inv.unsqueeze(0),
        out,
        n=n,
        config=config,
        block_shape=block_shape,
        masked_m=valid,
        capacity=rows,
    )
    return out
