"""Attention variants of the emerging MoE families on the paged KV cache, around `PagedAttention`.

- sliding window (gpt-oss `sliding_attention` layers): query at position p sees keys p - W < k <= p;
- chunked local attention (Llama-4 RoPE layers, `attention_chunk_size` C): keys in p's chunk, k // C == p // C;
- attention sinks (gpt-oss): one learned logit per query head joins the softmax and takes probability mass
  but contributes no value (softmax over [scores, sink], sink column dropped).

The KV cache layout, the slot writes and the padded index maps are exactly `PagedAttention`'s (the mask
from `build_padded_batch` is narrowed, once per step and shared by the layers of one kind). Pages outside
a sliding window / finished chunk are NOT freed: such layers keep every page like full-attention layers.
Shape legend: T new tokens, B sequences, Q_max longest query, C_max longest context, H heads, Hk KV heads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from moefleet.engine.layers.attention import (
    PaddedBatch,
    PagedAttention,
    padded_batch_for,
    paged_attention,
    write_slots,
)

if TYPE_CHECKING:
    from moefleet.engine.forward_batch import ForwardBatch


def local_mask(
    ctx: ForwardBatch, batch: PaddedBatch, sliding_window: int | None, chunk_size: int | None
) -> torch.Tensor:
    """`batch.mask` [B, 1, Q_max, C_max] narrowed to the window / chunk of each real query row.

    Padded query rows keep the base mask (they see every valid key), so no softmax row is all masked.
    """
    device = batch.mask.device
    query_lens = torch.tensor(ctx.query_lens, dtype=torch.long, device=device)
    context_lens = torch.tensor(ctx.seq_lens, dtype=torch.long, device=device)
    max_context = batch.mask.shape[-1]
    query_index = torch.arange(batch.max_query, device=device)[None, :]  # [1, Q_max]
    query_pos = (context_lens - query_lens)[:, None] + query_index  # [B, Q_max]
    key_pos = torch.arange(max_context, device=device)[None, None, :]  # [1, 1, C_max]
    keep = torch.ones(len(ctx.query_lens), batch.max_query, max_context, dtype=torch.bool, device=device)
    if sliding_window is not None:
        keep &= key_pos > query_pos[:, :, None] - sliding_window
    if chunk_size is not None:
        keep &= key_pos // chunk_size == query_pos[:, :, None] // chunk_size
    real_row = (query_index < query_lens[:, None])[:, :, None]  # [B, Q_max, 1]
    return batch.mask & (keep | ~real_row)[:, None]


def local_batch_for(
    ctx: ForwardBatch,
    device: torch.device,
    cache_backed: bool,
    sliding_window: int | None,
    chunk_size: int | None,
) -> PaddedBatch:
    """The step's `PaddedBatch` with the local mask (memoised on the forward batch per window / chunk size)."""
    batch = padded_batch_for(ctx, device, cache_backed)
    if sliding_window is None and chunk_size is None:
        return batch
    key = ("local_batch", str(device), cache_backed, sliding_window, chunk_size)
    return ctx.memo(
        key,
        lambda: replace(batch, mask=local_mask(ctx, batch, sliding_window, chunk_size), fresh_prefill=False),
    )


def attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PaddedBatch,
    scale: float,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """q [T, H, D]; k/v [B, C_max, Hk, D] per sequence; sinks [H] -> [T, H, D].

    softmax over [q.k * scale (masked), sink_h] in float32, the sink's column dropped before the values.
    As `paged_attention`, the H / Hk query heads of a KV head are folded into the query axis (no K/V copies).
    """
    num_tokens, num_heads, dim = q.shape
    num_seqs, max_query, num_kv_heads = batch.num_seqs, batch.max_query, k.shape[2]
    rep = num_heads // num_kv_heads
    padded = q.new_zeros(num_seqs * max_query, num_heads, dim)
    padded[batch.query_dest] = q
    # [B, Q, Hk, rep, D] -> [B, Hk, Q * rep, D]; row q * rep + r is query q of head hk * rep + r.
    qp = padded.view(num_seqs, max_query, num_kv_heads, rep, dim).permute(0, 2, 1, 3, 4)
    qp = qp.reshape(num_seqs, num_kv_heads, max_query * rep, dim)
    scores = torch.matmul(qp, k.permute(0, 2, 3, 1)).float() * scale  # [B, Hk, Q * rep, C]
    mask = batch.mask[:, :, :, None, :].expand(-1, -1, -1, rep, -1).reshape(num_seqs, 1, max_query * rep, -1)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, num_kv_heads, 1, rep).expand(num_seqs, -1, max_query, -1)
    probs = torch.softmax(torch.cat([scores, sink.reshape(num_seqs, num_kv_heads, -1, 1)], dim=-1), dim=-1)
    out = torch.matmul(probs[..., :-1].to(v.dtype), v.transpose(1, 2))  # [B, Hk, Q * rep, Dv]
    out = out.view(num_seqs, num_kv_heads, max_query, rep, -1).permute(0, 2, 1, 3, 4)
    return out.reshape(num_seqs * max_query, num_heads, -1)[batch.query_dest]


class LocalPagedAttention(PagedAttention):
    """`PagedAttention` with an optional sliding window or attention chunk, and optional per-head sinks.

    Same cache layout and `kv_cache_shape`; `forward(q, k, v, batch, sinks=None)` with sinks [H] (gpt-oss).
    It always runs the torch reference path (host-built index maps), whatever the step's attention backend,
    so models using it are never captured in CUDA graphs (`supports_cuda_graphs`).
    """

    supports_cuda_graphs = False

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        for name, value in (("sliding_window", sliding_window), ("attention_chunk_size", chunk_size)):
            if value is not None and value < 1:
                raise ValueError(f"config.json field {name!r} must be >= 1, got {value}")
        self.sliding_window, self.chunk_size = sliding_window, chunk_size

    def forward(  # type: ignore[override]
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hk, D] -> [T, H, D]."""
        if q.shape[0] == 0:
            return q.new_empty(0, self.num_heads, self.head_dim)
        ctx = batch
        cache_backed = self.kv_cache.numel() > 0
        padded = local_batch_for(ctx, q.device, cache_backed, self.sliding_window, self.chunk_size)
        if cache_backed:
            k_flat = self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)
            v_flat = self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
            write_slots(k_flat, ctx, k)
            write_slots(v_flat, ctx, v)
        else:
            k_flat, v_flat = k, v
        keys = k_flat[padded.kv_source].to(q.dtype)  # [B, C_max, Hk, D]
        values = v_flat[padded.kv_source].to(q.dtype)
        if sinks is not None:
            return attention_with_sinks(q, keys, values, padded, self.scale, sinks)
        return paged_attention(q, keys, values, padded, self.scale)

    def extra_repr(self) -> str:
        return f"sliding_window={self.sliding_window}, chunk_size={self.chunk_size}"
