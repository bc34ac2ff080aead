"""Sliding-window, chunked and sink attention on the paged cache against a per-query reference written from
the definitions, for mixed prefill / chunk / decode batches (the same steps as test_layers_attention):
chunks through `LocalPagedAttention` (Llama-4), windows and sinks through `PagedAttention` and the torch
attention backend, as gpt-oss runs them (the Triton kernels: tests/gpu/test_attention_kernels_gpu.py)."""

from __future__ import annotations

import math

import pytest
import torch
from moefleet.engine.forward_batch import ForwardBatch
from moefleet.engine.layers.attention import PagedAttention
from moefleet.engine.layers.attention_variants import LocalPagedAttention

BLOCK = 4
# Three sequences of 9, 6 and 5 tokens: step 1 = prefill seq0[:5] and seq1[:5]; step 2 = a chunk of seq0
# attending to the cache, a decode of seq1 and a fresh prompt; step 3 = decodes.
STEPS = [
    [(0, 0, 5), (1, 0, 5)],
    [(0, 5, 3), (1, 5, 1), (2, 0, 4)],
    [(0, 8, 1), (2, 4, 1)],
]
LENGTHS = {0: 9, 1: 6, 2: 5}


class Cache:
    """Hands out shuffled blocks; builds ForwardBatches for steps of (seq, start, count)."""

    def __init__(self, num_blocks=32):
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables: dict[int, list[int]] = {}

    def context(self, steps):
        for seq, start, count in steps:
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK < start + count:
                table.append(self.free.pop())
        return ForwardBatch.build(
            input_ids=[0] * sum(n for _, _, n in steps),
            positions=[p for _, a, n in steps for p in range(a, a + n)],
            query_lens=[n for _, _, n in steps],
            seq_lens=[a + n for _, a, n in steps],
            block_tables=[self.tables[seq] for seq, _, _ in steps],
            block_size=BLOCK,
            device="cpu",
        )


def reference(q, k, v, scale, window=None, chunk=None, sinks=None):
    """q [L, H, D], k/v [L, Hk, D] of one whole sequence -> [L, H, D], one query row at a time.

    Query p sees key j iff j <= p, and p - window < j (window), and j // chunk == p // chunk (chunk);
    with sinks, softmax runs over [scores of visible keys, sinks[h]] and the sink's share is dropped."""
    length, heads, _ = q.shape
    rep = heads // k.shape[1]
    out = torch.zeros_like(q)
    for p in range(length):
        visible = [
            j
            for j in range(p + 1)
            if (window is None or j > p - window) and (chunk is None or j // chunk == p // chunk)
        ]
        for h in range(heads):
            scores = [float(q[p, h] @ k[j, h // rep]) * scale for j in visible]
            logits = scores + ([float(sinks[h])] if sinks is not None else [])
            top = max(logits)
            weights = [math.exp(s - top) for s in logits]
            total = sum(weights)
            for j, w in zip(visible, weights, strict=False):
                out[p, h] += w / total * v[j, h // rep]
    return out


@pytest.mark.parametrize(
    ("window", "chunk", "with_sinks"),
    [(3, None, False), (3, None, True), (None, 4, False), (None, None, True), (1, None, True)],
    ids=["window3", "window3-sinks", "chunk4", "sinks", "window1-sinks"],
)
def test_local_attention_matches_the_definition(window, chunk, with_sinks):
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, scale = 4, 2, 8, 0.4
    seq_q = {s: torch.randn(n, heads, dim, generator=g) for s, n in LENGTHS.items()}
    seq_k = {s: torch.randn(n, kv_heads, dim, generator=g) for s, n in LENGTHS.items()}
    seq_v = {s: torch.randn(n, kv_heads, dim, generator=g) for s, n in LENGTHS.items()}
    sinks = torch.randn(heads, generator=g) * 2 if with_sinks else None
    attn = (
        LocalPagedAttention(heads, kv_heads, dim, scale, chunk_size=chunk)
        if chunk is not None
        else PagedAttention(heads, kv_heads, dim, scale, sliding_window=window)
    )
    attn.kv_cache = torch.zeros(attn.kv_cache_shape(32, BLOCK))
    cache = Cache()
    outputs: dict[int, list[torch.Tensor]] = {s: [] for s in LENGTHS}
    for steps in STEPS:
        q = torch.cat([seq_q[s][a : a + n] for s, a, n in steps])
        k = torch.cat([seq_k[s][a : a + n] for s, a, n in steps])
        v = torch.cat([seq_v[s][a : a + n] for s, a, n in steps])
        ctx = cache.context(steps)
        out = attn(q, k, v, ctx) if chunk is not None else attn(q, k, v, ctx, sinks=sinks)
        for (s, _, _), piece in zip(steps, out.split([n for _, _, n in steps]), strict=True):
            outputs[s].append(piece)
    for s in LENGTHS:
        expected = reference(seq_q[s], seq_k[s], seq_v[s], scale, window, chunk, sinks)
        torch.testing.assert_close(torch.cat(outputs[s]), expected, atol=1e-5, rtol=1e-5)


def test_without_cache_attends_within_the_step():
    attn = PagedAttention(2, 1, 4, 0.5, sliding_window=2)
    q, k, v = torch.randn(5, 2, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    out = attn(q, k, v, ForwardBatch.prefill_without_cache([3, 2], "cpu"))
    torch.testing.assert_close(out[:3], reference(q[:3], k[:3], v[:3], 0.5, window=2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[3:], reference(q[3:], k[3:], v[3:], 0.5, window=2), atol=1e-6, rtol=1e-6)


def test_bad_window_or_chunk_is_rejected():
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        PagedAttention(2, 1, 4, 0.5, sliding_window=0)
    with pytest.raises(ValueError, match="'attention_chunk_size' must be >= 1"):
        LocalPagedAttention(2, 1, 4, 0.5, chunk_size=0)
