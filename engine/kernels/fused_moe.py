"""Fused MoE expert computation in Triton: grouped gate/up GEMM with SiLU(gate)*up in the epilogue, then
the grouped down GEMM (optionally times the routing weight), over rows aligned per expert on the device.

Three layouts, one GEMM kernel:
- `fused_experts_topk`: tokens [T, D] with local expert ids [T, K] (-1 = another rank's expert) and routing
  weights; returns sum_k weight * expert(x) in token order [T, D]. Unused hits contribute zero.
- `fused_experts_grouped`: rows [N, D] already grouped by local expert (the dispatcher's layout) with
  `counts` [E] in device memory; returns unweighted outputs [N, D] in the same order.
- `fused_experts_masked`: the low-latency dispatch layout x [E, C, D] with valid rows `masked_m` [E] per
  expert (DeepEP low-latency output); returns [E, C, D]; rows at or past masked_m[e] are left unwritten.
The launch grid depends only on shapes (worst case: every expert's last block ragged), blocks past the
padded total read from device memory exit at once: no host synchronisation, CUDA-graph capturable.

FP8 (w8a8, DeepSeek's block format): weights float8_e4m3fn [E, O, I] with `scale_inv` [E, O/bo, I/bi]
(bo x bi = 128 x 128 in released checkpoints); activations are quantised per row per group of bi columns by
`fp8_quant.quantize_per_token_group` just before each GEMM; each K tile's partial product is scaled by the
row's activation scale times the column's weight-tile scale.
Shape legend: T tokens, K top-k (`top_k`), N rows, E local experts, C capacity per expert, D hidden,
I expert intermediate size; w13 [E, 2I, D] (gate rows :I, up rows I:), w2 [E, D, I].
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
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
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_asm,
    stride_ask,
    stride_bse,
    stride_bsn,
    stride_bsk,
    A_ROW_DIV: tl.constexpr,
    MASKED: tl.constexpr,
    SWIGLU: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    FP8: tl.constexpr,
    UPCAST_FP8: tl.constexpr,
    UPCAST_TYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
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

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if MASKED:
        expert = tl.program_id(1)
        valid = tl.load(masked_m_ptr + expert)
        if pid_m * BLOCK_M >= valid:
            return
        row_mask = offs_m < valid
        rows = expert.to(tl.int64) * num_rows + offs_m
        a_rows = rows
    else:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        ids = tl.load(sorted_ids_ptr + offs_m)
        row_mask = ids < num_rows
        expert = tl.load(expert_ids_ptr + pid_m)
        rows = ids.to(tl.int64)
        a_rows = rows // A_ROW_DIV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    b_ptrs = b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    if SWIGLU:
        u_ptrs = b_base + (offs_n[None, :] + up_offset) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FP8:
        as_ptrs = a_scale_ptr + a_rows * stride_asm
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
        if FP8:
            if UPCAST_FP8:
                a = a.to(UPCAST_TYPE)
                b = b.to(UPCAST_TYPE)
                if SWIGLU:
                    u = u.to(UPCAST_TYPE)
            k_group = (k_tile * BLOCK_K) // GROUP_K
            a_s = tl.load(as_ptrs + k_group * stride_ask, mask=row_mask, other=0.0)
            b_s = tl.load(bs_ptrs + k_group * stride_bsk, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            if SWIGLU:
                u_s = tl.load(us_ptrs + k_group * stride_bsk, mask=n_mask, other=0.0)
                acc_up += tl.dot(a, u) * a_s[:, None] * u_s[None, :]
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
    a_row_div: int = 1,
    swiglu: bool = False,
    weights: torch.Tensor | None = None,
) -> None:
    k = a.shape[1]
    fp8 = b.dtype == FP8_DTYPE
    block_k = config.block_k
    if fp8:
        assert block_shape is not None
        block_k = min(block_k, block_shape[1])
        if block_shape[1] % block_k:
            raise ValueError(f"BLOCK_K {block_k} must divide the FP8 group {block_shape[1]}")
    num_n = triton.cdiv(n, config.block_n)
    if masked_m is not None:
        grid = (triton.cdiv(capacity, config.block_m) * num_n, masked_m.shape[0])
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
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        out.stride(0),
        out.stride(1),
        a_s.stride(0) if a_scale is not None else 0,
        a_s.stride(1) if a_scale is not None else 0,
        b_s.stride(0) if b_scale is not None else 0,
        b_s.stride(1) if b_scale is not None else 0,
        b_s.stride(2) if b_scale is not None else 0,
        A_ROW_DIV=a_row_div,
        MASKED=masked_m is not None,
        SWIGLU=swiglu,
        MUL_WEIGHT=weights is not None,
        FP8=fp8,
        UPCAST_FP8=fp8 and (_INTERPRET or block_k < 32),  # fp8 MMAs need K tiles of 32
        UPCAST_TYPE=tl.float32 if _INTERPRET else tl.bfloat16,  # bf16 holds every e4m3 value exactly
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # float32 stays float32 (no TF32)
        GROUP_N=block_shape[0] if block_shape else 1,
        GROUP_K=block_shape[1] if block_shape else 1,
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
):
    """gate/up (+SiLU*up) into an intermediate [rows, I], then down into `out`."""
    fp8 = w13.dtype == FP8_DTYPE
    inter = w13.shape[1] // 2
    act_dtype = out.dtype
    aligned, masked_m, capacity = aligned_or_masked
    mid = torch.empty((rows, inter), dtype=act_dtype, device=hidden.device)
    a, a_s = _maybe_quant(hidden, fp8, block_shape)
    common = dict(
        config=config, block_shape=block_shape, aligned=aligned, masked_m=masked_m, capacity=capacity
    )
    _gemm(a, a_s, w13, w13_scale, mid, n=inter, a_row_div=a_row_div, swiglu=True, **common)  # type: ignore[arg-type]
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
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """x [E, C, D], masked_m [E] valid rows per expert (device) -> [E, C, D] (rows >= masked_m[e] unwritten)."""
    fp8 = _check_weights(w13, w2, w13_scale, w2_scale, block_shape)
    num_experts, capacity, hidden = x.shape
    if num_experts != w13.shape[0]:
        raise ValueError(f"x has {num_experts} experts, weights have {w13.shape[0]}")
    config = config or pick_config(num_experts, w13.shape[1] // 2, hidden, num_experts * capacity, fp8)
    flat = x.reshape(num_experts * capacity, hidden).contiguous()
    out = torch.empty_like(flat)
    _two_gemms(
        flat,
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
