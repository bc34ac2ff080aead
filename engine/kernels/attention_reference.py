"""Slow, obviously-correct torch references for the attention kernels (the test oracle, and the CPU path).

Written from the formula: an explicit loop over sequences, keys gathered page by page through the block table,
scores in float32, a masked softmax with the optional attention sink (an extra logit per head in the denominator
that carries no value) and sliding window (key j is visible to the query at position p iff p - W < j <= p).
Outputs are returned in the query's dtype. Shape legend: B sequences, T packed query tokens, H query heads,
Hk KV heads (H % Hk == 0; query head h reads KV head h // (H // Hk)), Dk/Dv key/value widths, R latent rank.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gather_pages(cache: Tensor, block_table: Tensor, length: int) -> Tensor:
    """Rows 0..length-1 of one sequence from a paged cache [N, block_size, ...] -> [length, ...]:
    key j is slot j % block_size of page block_table[j // block_size]."""
    block_size = cache.shape[1]
    j = torch.arange(length, device=cache.device)
    pages = block_table.to(cache.device).long()[j // block_size]
    return cache[pages, j % block_size]


def _attend(
    q: Tensor,  # [Tq, H, Dk] queries at `positions`
    k: Tensor,  # [L, Hk, Dk] keys at positions 0..L-1
    v: Tensor,  # [L, Hk, Dv]
    positions: Tensor,  # [Tq] int
    scale: float,
    sinks: Tensor | None,
    sliding_window: int | None,
) -> Tensor:
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    kf = k.float().repeat_interleave(group, dim=1)  # [L, H, Dk]
    vf = v.float().repeat_interleave(group, dim=1)  # [L, H, Dv]
    scores = torch.einsum("thd,lhd->htl", q.float(), kf) * scale  # [H, Tq, L]
    key_pos = torch.arange(k.shape[0], device=q.device)
    visible = key_pos[None, :] <= positions[:, None]  # [Tq, L]
    if sliding_window is not None:
        visible &= key_pos[None, :] > positions[:, None] - sliding_window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    if sinks is not None:
        sink = sinks.float()[:, None, None].expand(heads, q.shape[0], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # a query with no visible key (and no sink) attends to nothing
    return torch.einsum("htl,lhd->thd", probs, vf)  # [Tq, H, Dv]


def paged_decode_ref(
    q: Tensor,  # [B, H, Dk]
    k_cache: Tensor,  # [N, block_size, Hk, Dk]
    v_cache: Tensor,  # [N, block_size, Hk, Dv]
    block_tables: Tensor,  # [B, M] int32
    seq_lens: Tensor,  # [B] int32, including the new token
    scale: float,
    *,
    sinks: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    out = q.new_zeros((q.shape[0], q.shape[1], v_cache.shape[-1]))
    for b in range(q.shape[0]):
        length = int(seq_lens[b])
        k = _gather_pages(k_cache, block_tables[b], length)
        v = _gather_pages(v_cache, block_tables[b], length)
        pos = torch.tensor([length - 1], device=q.device)
        out[b] = _attend(q[b : b + 1], k, v, pos, scale, sinks, sliding_window)[0].to(q.dtype)
    return out


def paged_prefill_ref(
    q: Tensor,  # [T, H, Dk] packed
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_query_lens: Tensor,  # [B + 1]
    seq_lens: Tensor,  # [B] cached + new
    scale: float,
    *,
    sinks: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    out = q.new_zeros((q.shape[0], q.shape[1], v_cache.shape[-1]))
    for b in range(len(seq_lens)):
        start, end = int(cu_query_lens[b]), int(cu_query_lens[b + 1])
        length = int(seq_lens[b])
        k = _gather_pages(k_cache, block_tables[b], length)
        v = _gather_pages(v_cache, block_tables[b], length)
        pos = torch.arange(length - (end - start), length, device=q.device)
        out[start:end] = _attend(q[start:end], k, v, pos, scale, sinks, sliding_window).to(q.dtype)
    return out


def varlen_prefill_ref(
    q: Tensor,  # [T, H, Dk]
    k: Tensor,  # [S, Hk, Dk] packed
    v: Tensor,  # [S, Hk, Dv]
    cu_query_lens: Tensor,
    cu_kv_lens: Tensor,
    scale: float,
    *,
    sinks: Tensor | None = None,
    sliding_window: int | None = None,
) -> Tensor:
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    for b in range(len(cu_query_lens) - 1):
        start, end = int(cu_query_lens[b]), int(cu_query_lens[b + 1])
        kv_start, kv_end = int(cu_kv_lens[b]), int(cu_kv_lens[b + 1])
        length = kv_end - kv_start
        pos = torch.arange(length - (end - start), length, device=q.device)
        out[start:end] = _attend(
            q[start:end], k[kv_start:kv_end], v[kv_start:kv_end], pos, scale, sinks, sliding_window
        ).to(q.dtype)
    return out


def mla_decode_ref(
    q_latent: Tensor,  # [B, H, R]
    q_rope: Tensor,  # [B, H, Dr]
    kv_cache: Tensor,  # [N, block_size, R + Dr] rows = [c_kv | k_pe]
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    *,
    kv_lora_rank: int,
) -> Tensor:
    if kv_cache.dim() == 4:  # [N, bs, 1, R + Dr]
        kv_cache = kv_cache.squeeze(2)
    out = q_latent.new_zeros(q_latent.shape)
    for b in range(q_latent.shape[0]):
        rows = _gather_pages(kv_cache, block_tables[b], int(seq_lens[b])).float()  # [L, R + Dr]
        c_kv, k_pe = rows[:, :kv_lora_rank], rows[:, kv_lora_rank:]
        scores = (q_latent[b].float() @ c_kv.T + q_rope[b].float() @ k_pe.T) * scale  # [H, L]
        out[b] = (torch.softmax(scores, dim=-1) @ c_kv).to(q_latent.dtype)
    return out
