"""Paged causal attention over a block KV cache: one path for prefill, chunked prefill and decode.

The step's new tokens of all sequences are concatenated ([T, ...]). For sequence b with query_len q and
context_len c (cached + new), its query i sits at position c - q + i and attends to KV slots 0..c-q+i,
read through its block table. This reference implementation pads the batch to [B, Q_max] queries and
[B, C_max] keys and runs one masked `scaled_dot_product_attention`; a paged kernel (FlashAttention /
FlashMLA) can replace `paged_attention` without touching the layers.
Shape legend: T new tokens, B sequences, H query heads, Hk KV heads, D head dim, C_max longest context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moefleet.engine.context import ForwardContext, get_context
from torch import nn


@dataclass
class PaddedBatch:
    """Index maps between the flat step ([T]) and the padded per-sequence layout ([B, Q_max] / [B, C_max]).

    Padded query rows see every valid key, so softmax never meets an all-masked row; their output is dropped.
    """

    query_dest: torch.Tensor  # [T] position of each new token in the flattened [B * Q_max] query layout
    kv_source: torch.Tensor  # [B, C_max] row of the flat KV source (cache slots or step tokens) per key
    mask: torch.Tensor  # [B, 1, Q_max, C_max] True where the key is visible
    num_seqs: int
    max_query: int
    # Every sequence computes its whole context in this step (no cached history): plain causal attention
    # with queries and keys aligned at 0, so the kernel needs no mask (flash attention on GPU).
    fresh_prefill: bool = False


def build_padded_batch(ctx: ForwardContext, device: torch.device, cache_backed: bool) -> PaddedBatch:
    """Index maps for one step. `cache_backed=False` reads keys from the step's own tokens (no cache yet)."""
    query_lens = torch.tensor(ctx.query_lens, dtype=torch.long)
    context_lens = torch.tensor(ctx.context_lens, dtype=torch.long)
    num_seqs = len(ctx.query_lens)
    if num_seqs != len(ctx.context_lens):
        raise ValueError(
            f"query_lens ({num_seqs}) and context_lens ({len(ctx.context_lens)}) differ in length"
        )
    if bool((query_lens > context_lens).any()) or bool((query_lens < 1).any()):
        raise ValueError(
            f"need 1 <= query_len <= context_len per sequence, got {ctx.query_lens} / {ctx.context_lens}"
        )
    max_query = int(query_lens.max())
    max_context = int(context_lens.max())
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_lens)  # [T]
    starts = torch.cumsum(query_lens, 0) - query_lens
    index_in_seq = torch.arange(int(query_lens.sum())) - starts[seq_of_token]
    query_dest = seq_of_token * max_query + index_in_seq

    key_pos = torch.arange(max_context)[None, :]  # [1, C_max]
    if cache_backed:
        if ctx.block_tables is None:
            raise ValueError("the forward context has no block_tables but the KV cache is allocated")
        block_tables = ctx.block_tables.to("cpu", torch.long)
        block_index = (key_pos // ctx.block_size).expand(num_seqs, -1)
        needed_blocks = (max_context + ctx.block_size - 1) // ctx.block_size
        if block_tables.shape[1] < needed_blocks:
            raise ValueError(
                f"block_tables has {block_tables.shape[1]} columns, contexts need {needed_blocks}"
            )
        blocks = torch.gather(block_tables, 1, block_index)
        kv_source = blocks * ctx.block_size + key_pos % ctx.block_size
    else:
        if bool((query_lens != context_lens).any()):
            raise ValueError("attention has no KV cache allocated, so context_lens must equal query_lens")
        kv_source = starts[:, None] + key_pos
    key_valid = key_pos < context_lens[:, None]  # [B, C_max]
    kv_source = torch.where(key_valid, kv_source, torch.zeros_like(kv_source))
    if bool((kv_source < 0).any()):
        raise ValueError("a block table entry needed by a context is -1 (unallocated)")
    query_pos = (context_lens - query_lens)[:, None] + torch.arange(max_query)[None, :]  # [B, Q_max]
    # Padded query rows see every valid key, so softmax never sees an all-masked row (their output is dropped).
    mask = (key_pos[:, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :]
    return PaddedBatch(
        query_dest=query_dest.to(device),
        kv_source=kv_source.to(device),
        mask=mask[:, None].to(device),
        num_seqs=num_seqs,
        max_query=max_query,
        fresh_prefill=bool((query_lens == context_lens).all()),
    )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PaddedBatch, scale: float
) -> torch.Tensor:
    """q [T, H, D]; k [B, C_max, Hk, D] and v [B, C_max, Hk, Dv] gathered per sequence -> [T, H, Dv].

    The H / Hk query heads sharing a KV head are folded into the query axis, so keys and values are never
    repeated per head (MLA's latent attention has Hk = 1 and H = 128).
    """
    num_tokens, num_heads, dim = q.shape
    num_seqs, max_query, num_kv_heads = batch.num_seqs, batch.max_query, k.shape[2]
    rep = num_heads // num_kv_heads
    padded = q.new_zeros(num_seqs * max_query, num_heads, dim)
    padded[batch.query_dest] = q
    if batch.fresh_prefill:
        # Padded query rows only see padded keys past their own sequence; their output is dropped.
        qp = padded.view(num_seqs, max_query, num_heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qp, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=rep > 1
        )
        return out.transpose(1, 2).reshape(num_seqs * max_query, num_heads, -1)[batch.query_dest]
    # [B, Q, Hk, rep, D] -> [B, Hk, Q * rep, D]
    qp = padded.view(num_seqs, max_query, num_kv_heads, rep, dim).permute(0, 2, 1, 3, 4)
    qp = qp.reshape(num_seqs, num_kv_heads, max_query * rep, dim)
    mask = batch.mask[:, :, :, None, :].expand(-1, -1, -1, rep, -1).reshape(num_seqs, 1, max_query * rep, -1)
    out = F.scaled_dot_product_attention(
        qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    out = out.view(num_seqs, num_kv_heads, max_query, rep, -1).permute(0, 2, 1, 3, 4)
    return out.reshape(num_seqs * max_query, num_heads, -1)[batch.query_dest]


def padded_batch_for(ctx: ForwardContext, device: torch.device, cache_backed: bool) -> PaddedBatch:
    """`build_padded_batch`, computed once per step and shared by all layers (memoised on the context)."""
    key = ("padded_batch", str(device), cache_backed)
    if key not in ctx.derived:
        ctx.derived[key] = build_padded_batch(ctx, device, cache_backed)
    return ctx.derived[key]


def _slot_rows(ctx: ForwardContext, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the step's tokens that have a KV slot, their slots), once per step: slots < 0 (padding
    tokens) are skipped. Shared by all layers, so the mask -> index sync happens once, not per layer."""
    key = ("slot_rows", str(device))
    if key not in ctx.derived:
        if ctx.slot_mapping is None:
            raise ValueError("the forward context has no slot_mapping but the KV cache is allocated")
        slots = ctx.slot_mapping.to(device, torch.long)
        rows = torch.nonzero(slots >= 0).squeeze(1)
        ctx.derived[key] = (rows, slots[rows])
    return ctx.derived[key]


def write_slots(flat_cache: torch.Tensor, ctx: ForwardContext, values: torch.Tensor) -> None:
    """flat_cache [S, ...][slot] = values [T, ...] for the step's slot_mapping, skipping slots < 0."""
    rows, slots = _slot_rows(ctx, flat_cache.device)
    flat_cache[slots] = values[rows].to(flat_cache.dtype)


class PagedAttention(nn.Module):
    """GQA attention over this layer's paged KV cache (no projections: q, k, v come in already roped).

    KV cache layout: [2, num_blocks, block_size, Hk, D] (index 0 = K, 1 = V). The model runner allocates
    it with `kv_cache_shape` and assigns `self.kv_cache`; until then the layer attends within the step
    (useful for warm-up/profiling runs, which must then be whole prompts).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) is not divisible by num_key_value_heads ({num_kv_heads})"
            )
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = (
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        )
        self.kv_cache = torch.empty(0)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hk, D] -> [T, H, D]."""
        if q.shape[0] == 0:
            return q.new_empty(0, self.num_heads, self.head_dim)
        ctx = get_context()
        cache_backed = self.kv_cache.numel() > 0
        batch = padded_batch_for(ctx, q.device, cache_backed)
        if cache_backed:
            k_flat = self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)
            v_flat = self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
            write_slots(k_flat, ctx, k)
            write_slots(v_flat, ctx, v)
        else:
            k_flat, v_flat = k, v
        keys, values = k_flat[batch.kv_source], v_flat[batch.kv_source]  # [B, C_max, Hk, D]
        return paged_attention(q, keys.to(q.dtype), values.to(q.dtype), batch, self.scale)
