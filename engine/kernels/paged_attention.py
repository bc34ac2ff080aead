"""Triton attention over the paged KV cache: decode (flash-decoding split-K + reduce) and varlen prefill.

Cache layout: k_cache [N_blocks, block_size, Hk, Dk], v_cache [N_blocks, block_size, Hk, Dv] (any strides, e.g.
views of one [2, N, bs, Hk, D] tensor); key j of sequence b lives at page block_tables[b, j // bs], slot
j % bs. Query head h reads KV head h // (H // Hk). Softmax in base 2 (scores * scale * log2 e), fp32
accumulation, output in the query's dtype. Attention sinks (gpt-oss) add exp(sink_h) to the denominator;
a sliding window W lets the query at position p see keys p - W < j <= p.

Graph capture: nothing here reads a device tensor on the host. Grids come from host shapes (B, heads,
num_splits, max_query_len); each program reads its own sequence length and exits early when it has no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention_config import (
    DecodeConfig,
    PrefillConfig,
    paged_decode_config,
    prefill_config,
    triton_next_power_of_2,
)

LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs use exact fp32 dots (Triton's default on GPU would be tf32); others use the default."""
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def _split_reduce_kernel(
    mid_o_ptr,  # [B, H, S, Dv] fp32, each split's output already divided by its own sum
    mid_lse_ptr,  # [B, H, S] fp32 log2-sum-exp2 of each split (-inf for an empty split)
    sinks_ptr,  # [H] or a dummy pointer
    out_ptr,  # [B, H, Dv]
    stride_mb,
    stride_mh,
    stride_ms,
    stride_md,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_ob,
    stride_oh,
    stride_od,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < DV
    lse = tl.load(
        mid_lse_ptr + b * stride_lb + h * stride_lh + offs_s * stride_ls, mask=s_mask, other=float("-inf")
    )
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink - m)
    o = tl.load(
        mid_o_ptr + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :] * stride_md,
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def split_reduce(mid_o: Tensor, mid_lse: Tensor, sinks: Tensor | None, out: Tensor) -> Tensor:
    """Combine per-split partial outputs [B, H, S, Dv] and their log2-sum-exp2 [B, H, S] into out [B, H, Dv]."""
    batch, heads, splits, dv = mid_o.shape
    _split_reduce_kernel[(batch, heads)](
        mid_o,
        mid_lse,
        sinks if sinks is not None else mid_lse,
        out,
        *mid_o.stride(),
        *mid_lse.stride(),
        *out.stride(),
        NUM_SPLITS=splits,
        BLOCK_S=triton_next_power_of_2(splits),
        DV=dv,
        BLOCK_DV=triton_next_power_of_2(dv),
        HAS_SINKS=sinks is not None,
        num_warps=4 if dv >= 256 else 2,
    )
    return out


@triton.jit
def finish_split(
    acc,  # [BLOCK_G, BLOCK_DV] fp32, unnormalised
    l_i,  # [BLOCK_G] sum of exp2 (relative to m_i)
    m_i,  # [BLOCK_G] running max (log2 units; -inf when the split saw no key)
    heads,
    h_mask,
    offs_d,
    d_mask,
    b,
    split,
    mid_o_ptr,
    mid_lse_ptr,
    sinks_ptr,
    out_ptr,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_md,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_ob,
    stride_oh,
    stride_od,
    NUM_SPLITS: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """With one split the program writes the final output (sink included); otherwise its partial for the
    reduce kernel: the split's output divided by its own sum, and its log2-sum-exp2."""
    if NUM_SPLITS == 1:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=h_mask, other=0.0).to(tl.float32) * 1.4426950408889634
            m_fin = tl.maximum(m_i, sink)
            rescale = tl.exp2(m_i - m_fin)
            acc = acc * rescale[:, None]
            l_i = l_i * rescale + tl.exp2(sink - m_fin)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=h_mask[:, None] & d_mask[None, :],
        )
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=h_mask)
        tl.store(
            mid_o_ptr
            + b * stride_mb
            + heads[:, None] * stride_mh
            + split * stride_ms
            + offs_d[None, :] * stride_md,
            acc / l_safe[:, None],
            mask=h_mask[:, None] & d_mask[None, :],
        )


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    sinks_ptr,
    out_ptr,
    qk_scale,
    window,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_btm,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_md,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_ob,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # one program: sequence b, KV head kh (all GROUP query heads sharing it), split `split` of the keys
    b = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = seq_len * 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    g_mask = offs_g < GROUP
    dk_mask = offs_dk < DK
    dv_mask = offs_dv < DV
    heads = kh * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_dk[None, :] * stride_qd,
        mask=g_mask[:, None] & dk_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + offs_n
        k_valid = keys < end
        block = tl.load(bt_row + (keys // BLOCK_SIZE) * stride_btm, mask=k_valid, other=0).to(tl.int64)
        slot = keys % BLOCK_SIZE
        k = tl.load(
            k_ptr
            + (block * stride_kb + slot * stride_ks + kh * stride_kh)[:, None]
            + offs_dk[None, :] * stride_kd,
            mask=k_valid[:, None] & dk_mask[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr
            + (block * stride_vb + slot * stride_vs + kh * stride_vh)[:, None]
            + offs_dv[None, :] * stride_vd,
            mask=k_valid[:, None] & dv_mask[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    finish_split(
        acc, l_i, m_i, heads, g_mask, offs_dv, dv_mask, b, split, mid_o_ptr, mid_lse_ptr, sinks_ptr, out_ptr,
        stride_mb, stride_mh, stride_ms, stride_md, stride_lb, stride_lh, stride_ls,
        stride_ob, stride_oh, stride_od, NUM_SPLITS, HAS_SINKS,
    )  # fmt: skip


def _check_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            f"k_cache/v_cache must be [N_blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if q.shape[-2] % kv_heads:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of kv heads ({kv_heads})")
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q head_dim ({q.shape[-1]}) != k_cache head_dim ({k_cache.shape[-1]})")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32 tensors")


def paged_decode(
    q: Tensor,  # [B, H, Dk], one new token per sequence
    k_cache: Tensor,  # [N, block_size, Hk, Dk]
    v_cache: Tensor,  # [N, block_size, Hk, Dv]
    block_tables: Tensor,  # [B, M] int32
    seq_lens: Tensor,  # [B] int32, KV length including the new token
    scale: float,
    *,
    sinks: Tensor | None = None,  # [H] fp32
    sliding_window: int | None = None,
    num_splits: int | None = None,
    out: Tensor | None = None,  # [B, H, Dv]
    max_seq_len: int | None = None,  # host hint for choosing splits (default: the block table's capacity)
    config: DecodeConfig | None = None,
) -> Tensor:
    _check_paged(q, k_cache, v_cache, block_tables, seq_lens)
    batch, heads, dk = q.shape
    block_size, kv_heads, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    if out is None:
        out = q.new_empty((batch, heads, dv))
    if batch == 0:
        return out
    group = heads // kv_heads
    max_len = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_len = min(max_len, sliding_window)
    cfg = config or paged_decode_config(batch, kv_heads, dk, max_len, q.device, num_splits)
    splits = cfg.num_splits
    mid_o, mid_lse = split_buffers(batch, heads, splits, dv, q.device)
    _paged_decode_split_kernel[(batch, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        mid_o,
        mid_lse,
        sinks if sinks is not None else mid_lse,
        out,
        scale * LOG2E,
        sliding_window or 0,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_tables.stride(),
        *mid_o.stride(),
        *mid_lse.stride(),
        *out.stride(),
        GROUP=group,
        BLOCK_G=max(16, triton_next_power_of_2(group)),
        DK=dk,
        DV=dv,
        BLOCK_DK=triton_next_power_of_2(dk),
        BLOCK_DV=triton_next_power_of_2(dv),
        BLOCK_SIZE=block_size,
        BLOCK_N=cfg.block_n,
        NUM_SPLITS=splits,
        HAS_SINKS=sinks is not None,
        USE_WINDOW=sliding_window is not None,
        DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        split_reduce(mid_o, mid_lse, sinks, out)
    return out


def split_buffers(
    batch: int, heads: int, splits: int, dv: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Partial outputs [B, H, S, Dv] and log2-sum-exp2 [B, H, S] in fp32 (1-element stand-ins for one split,
    where the split kernel writes the final output itself)."""
    if splits == 1:
        return torch.empty((1, 1, 1, 1), device=device), torch.empty((1, 1, 1), device=device)
    mid_o = torch.empty((batch, heads, splits, dv), dtype=torch.float32, device=device)
    return mid_o, torch.empty((batch, heads, splits), dtype=torch.float32, device=device)


@triton.jit
def _load_rows(ptrs, valid, MASKED: tl.constexpr):
    """Masked tiles load under `valid`; unmasked ones (all keys below ctx) without predicates."""
    if MASKED:
        return tl.load(ptrs, mask=valid, other=0)
    else:
        return tl.load(ptrs)


@triton.jit
def _prefill_tile(
    acc,
    l_i,
    m_i,
    q_a,
    q_b,
    start_n,
    pos,
    ctx,
    window,
    qk_scale,
    k_ptr,
    v_ptr,
    bt_row,
    kv_base,
    kh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_btm,
    kb_ptr,
    stride_kbs,
    stride_kbh,
    stride_kbd,
    offs_n,
    offs_dka,
    offs_dkb,
    offs_dv,
    DK: tl.constexpr,
    DK_A: tl.constexpr,
    HAS_DK_B: tl.constexpr,
    SPLIT_B: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    keys = start_n + offs_n
    k_valid = keys < ctx
    if PAGED:
        block = _load_rows(bt_row + (keys // BLOCK_SIZE) * stride_btm, k_valid, MASKED).to(tl.int64)
        slot = keys % BLOCK_SIZE
        k_rows = block * stride_kb + slot * stride_ks + kh * stride_kh
        v_rows = block * stride_vb + slot * stride_vs + kh * stride_vh
    else:
        k_rows = (kv_base + keys).to(tl.int64) * stride_kb + kh * stride_kh
        v_rows = (kv_base + keys).to(tl.int64) * stride_vb + kh * stride_vh
    # the key width is split into a power-of-two part (DK_A) and a remainder (Dk = 192 -> 128 + 64), so no
    # zero padding goes through the tensor cores
    k_a = _load_rows(k_ptr + k_rows[:, None] + offs_dka[None, :] * stride_kd, k_valid[:, None], MASKED)
    s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PREC)
    if HAS_DK_B:
        if SPLIT_B:  # the remainder columns live in their own tensor (MLA's shared rope key: head stride 0)
            kb_rows = (kv_base + keys).to(tl.int64) * stride_kbs + kh * stride_kbh
            kb_ptrs = kb_ptr + kb_rows[:, None] + (offs_dkb[None, :] - DK_A) * stride_kbd
        else:
            kb_ptrs = k_ptr + k_rows[:, None] + offs_dkb[None, :] * stride_kd
        k_b = tl.load(kb_ptrs, mask=k_valid[:, None] & (offs_dkb[None, :] < DK), other=0.0)
        s += tl.dot(q_b, tl.trans(k_b), input_precision=DOT_PREC)
    if BLOCK_DV == DV:
        v = _load_rows(v_ptr + v_rows[:, None] + offs_dv[None, :] * stride_vd, k_valid[:, None], MASKED)
    else:
        v = tl.load(
            v_ptr + v_rows[:, None] + offs_dv[None, :] * stride_vd,
            mask=k_valid[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
    if MASKED:
        visible = (keys[None, :] <= pos[:, None]) & k_valid[None, :]
        if USE_WINDOW:
            visible = visible & (keys[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    # scores stay unscaled; the scale folds into one FMA per element inside exp2
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays empty
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    cu_q_ptr,
    cu_kv_ptr,
    sinks_ptr,
    out_ptr,
    qk_scale,
    window,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_btm,
    stride_ot,
    stride_oh,
    stride_od,
    qb_ptr,
    stride_qbt,
    stride_qbh,
    stride_qbd,
    kb_ptr,
    stride_kbs,
    stride_kbh,
    stride_kbd,
    GROUP: tl.constexpr,
    DK: tl.constexpr,
    DK_A: tl.constexpr,
    BLOCK_DK_B: tl.constexpr,
    HAS_DK_B: tl.constexpr,
    SPLIT_B: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # one program: BLOCK_M queries of sequence b, query head h. Heads are the fastest grid axis, so the heads
    # sharing a KV head run together and read its pages from L2; query blocks go last-first (the longest
    # causal rows start first, the short ones fill the tail).
    h = tl.program_id(0)
    mb = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    if PAGED:
        kv_base = q_len * 0
        ctx = tl.load(seq_lens_ptr + b)
    else:
        kv_base = tl.load(cu_kv_ptr + b)
        ctx = tl.load(cu_kv_ptr + b + 1) - kv_base
    kh = h // GROUP

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dka = tl.arange(0, DK_A)
    offs_dkb = DK_A + tl.arange(0, BLOCK_DK_B)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < q_len
    pos = ctx - q_len + offs_m  # bottom-right aligned causal positions
    rows = (q_start + offs_m).to(tl.int64)
    q_rows = q_ptr + rows[:, None] * stride_qt + h * stride_qh
    q_a = tl.load(q_rows + offs_dka[None, :] * stride_qd, mask=m_valid[:, None], other=0.0)
    q_b = q_a
    if HAS_DK_B:
        if SPLIT_B:
            qb_ptrs = (
                qb_ptr + rows[:, None] * stride_qbt + h * stride_qbh + (offs_dkb[None, :] - DK_A) * stride_qbd
            )
        else:
            qb_ptrs = q_rows + offs_dkb[None, :] * stride_qd
        q_b = tl.load(qb_ptrs, mask=m_valid[:, None] & (offs_dkb[None, :] < DK), other=0.0)
    if HAS_SINKS:
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    first_pos = ctx - q_len + mb * BLOCK_M
    hi = tl.minimum(first_pos + BLOCK_M, ctx)  # keys any row of this block can see end before hi
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        full_end = lo
    else:
        lo = first_pos * 0
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys < full_end are visible to every row
    bt_row = bt_ptr + b * stride_btb
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q_a, q_b, start_n, pos, ctx, window, qk_scale, k_ptr, v_ptr, bt_row, kv_base, kh,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            stride_btm, kb_ptr, stride_kbs, stride_kbh, stride_kbd, offs_n, offs_dka, offs_dkb, offs_dv, DK, DK_A,
            HAS_DK_B, SPLIT_B, DV, BLOCK_DV, BLOCK_SIZE, PAGED,
            False, USE_WINDOW, DOT_PREC,
        )  # fmt: skip
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q_a, q_b, start_n, pos, ctx, window, qk_scale, k_ptr, v_ptr, bt_row, kv_base, kh,
            stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            stride_btm, kb_ptr, stride_kbs, stride_kbh, stride_kbd, offs_n, offs_dka, offs_dkb, offs_dv, DK, DK_A,
            HAS_DK_B, SPLIT_B, DV, BLOCK_DV, BLOCK_SIZE, PAGED,
            True, USE_WINDOW, DOT_PREC,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=m_valid[:, None] & (offs_dv[None, :] < DV),
    )


def rope_split_supported(head_dim: int, rope_dim: int) -> bool:
    """Whether `varlen_prefill` can read the rope columns from their own tensors: the kernel splits the key
    width into its largest power of two and the rest, so `head_dim` must be exactly that power of two."""
    return head_dim > 0 and head_dim & (head_dim - 1) == 0 and 0 < rope_dim < head_dim


def _launch_prefill(
    q: Tensor,
    k: Tensor,  # paged [N, bs, Hk, Dk] or packed [S, Hk, Dk]
    v: Tensor,
    block_tables: Tensor | None,
    seq_lens: Tensor | None,
    cu_query_lens: Tensor,
    cu_kv_lens: Tensor | None,
    scale: float,
    max_query_len: int,
    sinks: Tensor | None,
    sliding_window: int | None,
    config: PrefillConfig | None,
    rope: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    paged = block_tables is not None
    tokens, heads, dk = q.shape
    kv_heads, dv = k.shape[-2], v.shape[-1]
    if rope is not None:  # (q_rope [T, H, Dr], k_rope [S, Hk, Dr]): the key columns after q's and k's own
        q_b, k_b = rope
        dk += q_b.shape[-1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if cu_query_lens.dtype != torch.int32:
        raise ValueError("cu_query_lens must be an int32 tensor")
    out = q.new_empty((tokens, heads, dv))
    batch = cu_query_lens.shape[0] - 1
    if tokens == 0 or batch <= 0 or max_query_len <= 0:
        return out
    cfg = config or prefill_config(dk, dv, q.device, element_size=q.element_size())
    dk_a = triton_next_power_of_2(dk + 1) // 2  # the largest power of two <= dk
    if rope is not None and (
        paged or not rope_split_supported(q.shape[-1], q_b.shape[-1]) or k_b.shape[-1] != q_b.shape[-1]
    ):
        raise ValueError(
            f"split rope columns need packed K, a power-of-two first part and equal rope widths; got q "
            f"{tuple(q.shape)}, q_rope {tuple(q_b.shape)}, k_rope {tuple(k_b.shape)}"
        )
    if paged:
        assert block_tables is not None and seq_lens is not None
        k_strides, v_strides = k.stride(), v.stride()
        bt, bt_strides, block_size = block_tables, block_tables.stride(), k.shape[1]
    else:
        # packed rows: row index plays the page, the slot stride is unused
        k_strides = (k.stride(0), 0, k.stride(1), k.stride(2))
        v_strides = (v.stride(0), 0, v.stride(1), v.stride(2))
        bt, bt_strides, block_size = cu_query_lens, (0, 0), 16
    grid = (heads, triton.cdiv(max_query_len, cfg.block_m), batch)
    _prefill_kernel[grid](
        q,
        k,
        v,
        bt,
        seq_lens if seq_lens is not None else cu_query_lens,
        cu_query_lens,
        cu_kv_lens if cu_kv_lens is not None else cu_query_lens,
        sinks if sinks is not None else q,
        out,
        scale * LOG2E,
        sliding_window or 0,
        *q.stride(),
        *k_strides,
        *v_strides,
        *bt_strides,
        *out.stride(),
        q_b if rope is not None else q,
        *(q_b.stride() if rope is not None else (0, 0, 0)),
        k_b if rope is not None else k,
        *(k_b.stride() if rope is not None else (0, 0, 0)),
        GROUP=heads // kv_heads,
        DK=dk,
        DK_A=dk_a,
        BLOCK_DK_B=max(16, triton_next_power_of_2(dk - dk_a)),
        HAS_DK_B=dk_a < dk,
        SPLIT_B=rope is not None,
        DV=dv,
        BLOCK_DV=triton_next_power_of_2(dv),
        BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        PAGED=paged,
        HAS_SINKS=sinks is not None,
        USE_WINDOW=sliding_window is not None,
        DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def paged_prefill(
    q: Tensor,  # [T, H, Dk] packed varlen queries
    k_cache: Tensor,  # [N, block_size, Hk, Dk], new K already written
    v_cache: Tensor,  # [N, block_size, Hk, Dv]
    block_tables: Tensor,  # [B, M] int32
    cu_query_lens: Tensor,  # [B + 1] int32
    seq_lens: Tensor,  # [B] int32 context lengths (cached + new)
    scale: float,
    *,
    max_query_len: int,  # host int >= the longest query of the batch (sizes the grid; longer rows are cut)
    sinks: Tensor | None = None,
    sliding_window: int | None = None,
    config: PrefillConfig | None = None,
) -> Tensor:
    _check_paged(q, k_cache, v_cache, block_tables, seq_lens)
    return _launch_prefill(
        q, k_cache, v_cache, block_tables, seq_lens, cu_query_lens, None, scale, max_query_len,
        sinks, sliding_window, config,
    )  # fmt: skip


def varlen_prefill(
    q: Tensor,  # [T, H, Dk]
    k: Tensor,  # [S, Hk, Dk] packed
    v: Tensor,  # [S, Hk, Dv]
    cu_query_lens: Tensor,  # [B + 1] int32
    cu_kv_lens: Tensor,  # [B + 1] int32
    scale: float,
    *,
    max_query_len: int,
    sinks: Tensor | None = None,
    sliding_window: int | None = None,
    config: PrefillConfig | None = None,
    q_rope: Tensor | None = None,  # [T, H, Dr]: more query columns, after q's (MLA: q_pe, no concatenation)
    k_rope: Tensor | None = None,  # [S, Hk, Dr] (head stride 0 for MLA's one shared rope key per token)
) -> Tensor:
    """Causal attention over packed varlen sequences. With q_rope / k_rope the key width is Dk + Dr, read from
    the two tensors in place of [q | q_rope] and [k | k_rope] (Dk must be a power of two)."""
    if k.dim() != 3 or v.dim() != 3 or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"varlen_prefill wants q [T, H, Dk], k [S, Hk, Dk], v [S, Hk, Dv]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_kv_lens.dtype != torch.int32:
        raise ValueError("cu_kv_lens must be an int32 tensor")
    if (q_rope is None) != (k_rope is None):
        raise ValueError("give both q_rope and k_rope, or neither")
    rope = None
    if q_rope is not None and k_rope is not None:
        if q_rope.shape[:2] != q.shape[:2] or k_rope.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"q_rope / k_rope must match q / k in their first two dims; got {tuple(q_rope.shape)} for q "
                f"{tuple(q.shape)}, {tuple(k_rope.shape)} for k {tuple(k.shape)}"
            )
        rope = (q_rope, k_rope)
    return _launch_prefill(
        q, k, v, None, None, cu_query_lens, cu_kv_lens, scale, max_query_len, sinks, sliding_window, config,
        rope,
    )  # fmt: skip


__all__ = [
    "paged_decode",
    "paged_prefill",
    "varlen_prefill",
    "split_reduce",
    "dot_precision",
    "rope_split_supported",
]
