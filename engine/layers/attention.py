"""GQA attention over a paged KV cache: the layer holds the cache, the step's attention backend does the rest.

The reference building blocks (`PaddedBatch`, `build_padded_batch`, `paged_attention`, `padded_batch_for`,
`write_slots`) live in engine/attention/torch_backend.py and are re-exported here for model code that builds
its own attention variant on them.
Shape legend: T new tokens, H query heads, Hk KV heads, D head dim.
"""

from __future__ import annotations

import torch
from moefleet.engine.attention.torch_backend import (
    PaddedBatch,
    build_padded_batch,
    padded_batch_for,
    paged_attention,
    window_mask,
    write_slots,
)
from moefleet.engine.forward_batch import ForwardBatch
from torch import nn

__all__ = [
    "PagedAttention",
    "PaddedBatch",
    "build_padded_batch",
    "padded_batch_for",
    "paged_attention",
    "window_mask",
    "write_slots",
]


class PagedAttention(nn.Module):
    """GQA attention over this layer's paged KV cache (no projections: q, k, v come in already roped).

    KV cache layout: [2, num_blocks, block_size, Hk, D] (index 0 = K, 1 = V). The model runner allocates
    it with `kv_cache_shape` and assigns `self.kv_cache`; until then the layer attends within the step
    (useful for warm-up/profiling runs, which must then be whole prompts).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ):
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        # None: full causal attention; W: the query at position p sees keys p - W < j <= p.
        self.sliding_window = sliding_window
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

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hk, D] -> [T, H, D]; sinks [H] (gpt-oss) join every softmax."""
        if q.shape[0] == 0:
            return q.new_empty(0, self.num_heads, self.head_dim)
        return batch.backend.forward_gqa(self, q, k, v, batch, sinks=sinks)
