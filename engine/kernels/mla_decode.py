"""Triton MLA decode over the compressed latent cache (DeepSeek-V3 / Kimi-K2 with absorbed weights).

kv_cache [N_blocks, block_size, R + Dr] rows = [c_kv (R) | k_pe (Dr)] (a [N, bs, 1, R + Dr] view is accepted).
score(h, j) = (q_latent[h] . c_kv[j] + q_rope[h] . k_pe[j]) * scale; out[h] = sum_j softmax(score)[h, j] c_kv[j].
One latent KV head is shared by all H query heads: a program covers BLOCK_H heads of one (sequence, split) and
loads each page once for them; the head blocks of one (sequence, split) are adjacent in the grid (axis 0), so
the page comes from HBM once and from L2 for the others. Split-K (flash-decoding) with the same reduce kernel
as paged_decode; capture-safe (no host reads of seq_lens; empty splits exit their loop at once).
Whole tiles load without key masks; only a sequence's last, partial tile is masked. When a tile lies within one
page (block_n <= block_size, e.g. 64-token pages), one block-table entry addresses it, and on Hopper the rows come
through TMA descriptors of the cache viewed as [pages * block_size, R + Dr] (64-token pages: 636 -> 508 us at
256 x 2,000 on H200, docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .attention_config import DecodeConfig, mla_decode_config, triton_next_power_of_2
from .paged_attention import LOG2E, dot_precision, finish_split, split_buffers, split_reduce


@triton.jit
def _mla_tile(
    acc, l_i, m_i, q_lat, q_pe, ql_tile, qr_tile, ql_mask, qr_mask,
    kv_ptr, lat_desc, pe_desc, bt_row, start_n, end, qk_scale,
    stride_kvb, stride_kvs, stride_kvd, stride_btm,
    R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, Q_IN_LOOP: tl.constexpr,
    MASKED: tl.constexpr, PAGE_TILE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One BLOCK_N-key tile of the online softmax. MASKED: the sequence's last, partial tile (keys >= end are
    masked); otherwise every key is valid and the loads carry no key mask. PAGE_TILE: the tile lies within one
    page (BLOCK_N <= BLOCK_SIZE), so one block-table entry addresses contiguous rows; TMA (full tiles only):
    the rows come through tensor descriptors of the cache viewed as [pages * BLOCK_SIZE, R + DR]."""
    if Q_IN_LOOP:  # re-read the query tile (L1/L2) each tile: fewer live registers than holding it
        q_lat = tl.load(ql_tile, mask=ql_mask, other=0.0)
        q_pe = tl.load(qr_tile, mask=qr_mask, other=0.0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dr = tl.arange(0, BLOCK_DR)
    keys = start_n + offs_n
    k_valid = keys < end
    if TMA:
        page = tl.load(bt_row + (start_n // BLOCK_SIZE) * stride_btm).to(tl.int32)
        first = page * BLOCK_SIZE + start_n % BLOCK_SIZE
        c_kv = lat_desc.load([first, 0])
        k_pe = pe_desc.load([first, 0])
    else:
        if PAGE_TILE:
            page = tl.load(bt_row + (start_n // BLOCK_SIZE) * stride_btm).to(tl.int64)
            row = kv_ptr + page * stride_kvb + (start_n % BLOCK_SIZE + offs_n) * stride_kvs
        else:
            page = tl.load(bt_row + (keys // BLOCK_SIZE) * stride_btm, mask=k_valid, other=0).to(tl.int64)
            row = kv_ptr + page * stride_kvb + (keys % BLOCK_SIZE) * stride_kvs
        lat_ptrs = row[:, None] + offs_r[None, :] * stride_kvd
        pe_ptrs = row[:, None] + (R + offs_dr[None, :]) * stride_kvd
        if MASKED:
            c_kv = tl.load(lat_ptrs, mask=k_valid[:, None] & (offs_r < R)[None, :], other=0.0)
            k_pe = tl.load(pe_ptrs, mask=k_valid[:, None] & (offs_dr < DR)[None, :], other=0.0)
        elif BLOCK_R == R and BLOCK_DR == DR:
            c_kv = tl.load(lat_ptrs)
            k_pe = tl.load(pe_ptrs)
        else:
            c_kv = tl.load(lat_ptrs, mask=(offs_r < R)[None, :], other=0.0)
            k_pe = tl.load(pe_ptrs, mask=(offs_dr < DR)[None, :], other=0.0)
    s = tl.dot(q_lat, tl.trans(c_kv), input_precision=DOT_PREC)
    s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PREC)
    if MASKED:
        s = tl.where(k_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # the scale folds into one FMA inside exp2
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _mla_decode_split_kernel(
    ql_ptr, qr_ptr, kv_ptr, lat_desc, pe_desc, bt_ptr, seq_lens_ptr, mid_o_ptr, mid_lse_ptr, out_ptr, qk_scale, H,
    stride_qlb, stride_qlh, stride_qld, stride_qrb, stride_qrh, stride_qrd, stride_kvb, stride_kvs, stride_kvd,
    stride_btb, stride_btm, stride_mb, stride_mh, stride_ms, stride_md, stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr,
    Q_IN_LOOP: tl.constexpr, PAGE_TILE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    hb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # tiles below it need no key mask

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dr = tl.arange(0, BLOCK_DR)
    h_mask = heads < H
    r_mask = offs_r < R
    dr_mask = offs_dr < DR
    ql_tile = ql_ptr + b * stride_qlb + heads[:, None] * stride_qlh + offs_r[None, :] * stride_qld
    ql_mask = h_mask[:, None] & r_mask[None, :]
    qr_tile = qr_ptr + b * stride_qrb + heads[:, None] * stride_qrh + offs_dr[None, :] * stride_qrd
    qr_mask = h_mask[:, None] & dr_mask[None, :]
    q_lat = tl.load(ql_tile, mask=ql_mask, other=0.0)
    q_pe = tl.load(qr_tile, mask=qr_mask, other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    bt_row = bt_ptr + b * stride_btb
    for start_n in tl.range(start, full_end, BLOCK_N, disable_licm=Q_IN_LOOP):
        acc, l_i, m_i = _mla_tile(
            acc, l_i, m_i, q_lat, q_pe, ql_tile, qr_tile, ql_mask, qr_mask,
            kv_ptr, lat_desc, pe_desc, bt_row, start_n, end, qk_scale,
            stride_kvb, stride_kvs, stride_kvd, stride_btm,
            R, DR, BLOCK_R, BLOCK_DR, BLOCK_SIZE, BLOCK_N, DOT_PREC, Q_IN_LOOP, False, PAGE_TILE, TMA,
        )  # fmt: skip
    if full_end < end:
        acc, l_i, m_i = _mla_tile(
            acc, l_i, m_i, q_lat, q_pe, ql_tile, qr_tile, ql_mask, qr_mask,
            kv_ptr, lat_desc, pe_desc, bt_row, full_end, end, qk_scale,
            stride_kvb, stride_kvs, stride_kvd, stride_btm,
            R, DR, BLOCK_R, BLOCK_DR, BLOCK_SIZE, BLOCK_N, DOT_PREC, Q_IN_LOOP, True, PAGE_TILE, False,
        )  # fmt: skip

    finish_split(
        acc, l_i, m_i, heads, h_mask, offs_r, r_mask, b, split, mid_o_ptr, mid_lse_ptr, out_ptr, out_ptr,
        stride_mb, stride_mh, stride_ms, stride_md, stride_lb, stride_lh, stride_ls,
        stride_ob, stride_oh, stride_od, NUM_SPLITS, False,
    )  # fmt: skip


def tma_usable(kv_cache: Tensor, rank: int, rope_dim: int, block_n: int) -> bool:
    """TMA tiles need whole tiles within a page, dense 16-byte-aligned rows and power-of-two widths."""
    pages, block_size, width = kv_cache.shape
    aligned = kv_cache.data_ptr() % 16 == 0 and (rank * kv_cache.element_size()) % 16 == 0
    dense = kv_cache.stride() == (block_size * width, width, 1)
    powers = rank & (rank - 1) == 0 and rope_dim & (rope_dim - 1) == 0
    return block_n <= block_size and aligned and dense and powers


def _descriptors(kv_cache: Tensor, rank: int, rope_dim: int, block_n: int):
    """TMA descriptors of the cache viewed as rows [pages * block_size, rank + rope_dim]: the latent part and the
    rope part, each read block_n rows at a time."""
    if not tma_usable(kv_cache, rank, rope_dim, block_n):
        raise ValueError(
            "MLA decode over TMA needs a dense, 16-byte-aligned [pages, block_size, rank + rope_dim] cache, "
            f"power-of-two rank and rope dims and block_n <= block_size; got shape {tuple(kv_cache.shape)}, "
            f"strides {kv_cache.stride()}, block_n {block_n}: use a config with tma=False"
        )
    pages, block_size, width = kv_cache.shape
    rows = pages * block_size
    lat = TensorDescriptor(kv_cache, [rows, rank], [width, 1], [block_n, rank])
    pe = TensorDescriptor(kv_cache[:, :, rank:], [rows, rope_dim], [width, 1], [block_n, rope_dim])
    return lat, pe


def mla_decode(
    q_latent: Tensor,  # [B, H, R], q_nope already multiplied by the absorbed W_UK
    q_rope: Tensor,  # [B, H, Dr]
    kv_cache: Tensor,  # [N, block_size, R + Dr]
    block_tables: Tensor,  # [B, M] int32
    seq_lens: Tensor,  # [B] int32 including the new token
    scale: float,
    *,
    kv_lora_rank: int,
    num_splits: int | None = None,
    out: Tensor | None = None,  # [B, H, R]
    max_seq_len: int | None = None,  # host hint for choosing splits (default: the block table's capacity)
    config: DecodeConfig | None = None,
) -> Tensor:
    if kv_cache.dim() == 4 and kv_cache.shape[2] == 1:
        kv_cache = kv_cache.squeeze(2)
    batch, heads, rank = q_latent.shape
    rope_dim = q_rope.shape[-1]
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != kv_lora_rank + rope_dim or rank != kv_lora_rank:
        raise ValueError(
            f"mla_decode wants kv_cache [N, block_size, kv_lora_rank + rope_dim] = [*, *, {kv_lora_rank} + "
            f"{rope_dim}] and q_latent [B, H, {kv_lora_rank}]; got {tuple(kv_cache.shape)} and "
            f"{tuple(q_latent.shape)}"
        )
    block_size = kv_cache.shape[1]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32 tensors")
    if out is None:
        out = q_latent.new_empty((batch, heads, rank))
    if batch == 0:
        return out
    max_len = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    if config is None:
        capturing = q_latent.is_cuda and torch.cuda.is_current_stream_capturing()
        config = mla_decode_config(
            batch,
            heads,
            rank,
            max_len,
            q_latent.device,
            num_splits,
            kv_cache.element_size(),
            block_size,
            capturing,
        )
        if config.tma and not tma_usable(kv_cache, rank, rope_dim, config.block_n):
            config = dataclasses.replace(config, tma=False)
    cfg = config
    splits = cfg.num_splits
    mid_o, mid_lse = split_buffers(batch, heads, splits, rank, q_latent.device)
    page_tile = cfg.block_n <= block_size
    lat_desc = pe_desc = kv_cache  # stand-ins when the tiles are read through pointers
    if cfg.tma:
        lat_desc, pe_desc = _descriptors(kv_cache, rank, rope_dim, cfg.block_n)
    grid = (triton.cdiv(heads, cfg.block_h), batch, splits)
    _mla_decode_split_kernel[grid](
        q_latent,
        q_rope,
        kv_cache,
        lat_desc,
        pe_desc,
        block_tables,
        seq_lens,
        mid_o,
        mid_lse,
        out,
        scale * LOG2E,
        heads,
        *q_latent.stride(),
        *q_rope.stride(),
        *kv_cache.stride(),
        *block_tables.stride(),
        *mid_o.stride(),
        *mid_lse.stride(),
        *out.stride(),
        R=rank,
        DR=rope_dim,
        BLOCK_R=triton_next_power_of_2(rank),
        BLOCK_DR=triton_next_power_of_2(rope_dim),
        BLOCK_H=cfg.block_h,
        BLOCK_SIZE=block_size,
        BLOCK_N=cfg.block_n,
        NUM_SPLITS=splits,
        DOT_PREC=dot_precision(q_latent.dtype),
        Q_IN_LOOP=cfg.q_in_loop,
        PAGE_TILE=page_tile,
        TMA=cfg.tma,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        split_reduce(mid_o, mid_lse, None, out)
    return out
