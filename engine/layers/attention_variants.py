"""Chunked local attention (Llama-4 RoPE layers, `attention_chunk_size` C) on the paged KV cache, around
`PagedAttention`: the query at position p sees the keys of its own chunk, k // C == p // C (and k <= p).

Sliding windows and attention sinks (gpt-oss) are not here: `PagedAttention(sliding_window=W)` with
`sinks` runs them in every attention backend (torch reference and the Triton kernels).
The KV cache layout, the slot writes and the padded index maps are exactly `PagedAttention`'s (the mask
from `build_padded_batch` is narrowed, once per step and shared by the chunked layers). Pages of finished
chunks are NOT freed: such layers keep every page like full-attention layers.
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


def local_mask(ctx: ForwardBatch, batch: PaddedBatch, chunk_size: int) -> torch.Tensor:
    """`batch.mask` [B, 1, Q_max, C_max] narrowed to the chunk of each real query row.

    Padded query rows keep the base mask (they see every valid key), so no softmax row is all masked.
    """
    device = batch.mask.device
    query_lens = torch.tensor(ctx.query_lens, dtype=torch.long, device=device)
    context_lens = torch.tensor(ctx.seq_lens, dtype=torch.long, device=device)
    max_context = batch.mask.shape[-1]
    query_index = torch.arange(batch.max_query, device=device)[None, :]  # [1, Q_max]
    query_pos = (context_lens - query_lens)[:, None] + query_index  # [B, Q_max]
    key_pos = torch.arange(max_context, device=device)[None, None, :]  # [1, 1, C_max]
    keep = key_pos // chunk_size == query_pos[:, :, None] // chunk_size
    real_row = (query_index < query_lens[:, None])[:, :, None]  # [B, Q_max, 1]
    return batch.mask & (keep | ~real_row)[:, None]


def local_batch_for(
    ctx: ForwardBatch, device: torch.device, cache_backed: bool, chunk_size: int | None
) -> PaddedBatch:
    """The step's `PaddedBatch` with the chunk mask (memoised on the forward batch per chunk size)."""
    batch = padded_batch_for(ctx, device, cache_backed)
    if chunk_size is None:
        return batch
    key = ("local_batch", str(device), cache_backed, chunk_size)
    return ctx.memo(key, lambda: replace(batch, mask=local_mask(ctx, batch, chunk_size), fresh_prefill=False))


class LocalPagedAttention(PagedAttention):
    """`PagedAttention` with an optional attention chunk (None: full causal attention).

    Same cache layout and `kv_cache_shape`; `forward(q, k, v, batch)`. It always runs the torch reference
    path (host-built index maps), whatever the step's attention backend, so models using it are never
    captured in CUDA graphs (`supports_cuda_graphs`).
    """

    supports_cuda_graphs = False

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, chunk_size: int | None = None
    ):
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"config.json field 'attention_chunk_size' must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def forward(  # type: ignore[override]
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hk, D] -> [T, H, D]."""
        if q.shape[0] == 0:
            return q.new_empty(0, self.num_heads, self.head_dim)
        ctx = batch
        cache_backed = self.kv_cache.numel() > 0
        padded = local_batch_for(ctx, q.device, cache_backed, self.chunk_size)
        if cache_backed:
            k_flat = self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)
            v_flat = self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
            write_slots(k_flat, ctx, k)
            write_slots(v_flat, ctx, v)
        else:
            k_flat, v_flat = k, v
        keys = k_flat[padded.kv_source].to(q.dtype)  # [B, C_max, Hk, D]
        values = v_flat[padded.kv_source].to(q.dtype)
        return paged_attention(q, keys, values, padded, self.scale)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
