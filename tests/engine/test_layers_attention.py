"""Paged attention against independent oracles, for mixed prefill/chunk/decode batches: GQA against dense
causal attention written out here, MLA against transformers' DeepseekV3Attention on whole sequences."""

from __future__ import annotations

import math

import pytest
import torch
from moefleet.engine.forward_batch import ForwardBatch, ForwardMode
from moefleet.engine.layers.attention import PagedAttention
from moefleet.engine.layers.mla import MLAConfig, MLAttention
from moefleet.engine.layers.rotary import RotaryEmbedding

BLOCK = 4


def dense_causal(q, k, v, scale):
    """q [L, H, D], k/v [L, Hk, D] for one whole sequence -> [L, H, Dv]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class Cache:
    """Hands out shuffled blocks; builds ForwardBatches for steps of (seq, start, count)."""

    def __init__(self, num_blocks=32):
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables: dict[int, list[int]] = {}

    def batch(self, steps, backend=None):
        query_lens, seq_lens = [], []
        for seq, start, count in steps:
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK < start + count:
                table.append(self.free.pop())
            query_lens.append(count)
            seq_lens.append(start + count)
        return ForwardBatch.build(
            input_ids=[0] * sum(query_lens),
            positions=[p for _, a, n in steps for p in range(a, a + n)],
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=[self.tables[seq] for seq, _, _ in steps],
            block_size=BLOCK,
            device="cpu",
            attn_backend=backend,
        )


def no_cache(lens):
    return ForwardBatch.prefill_without_cache(lens, "cpu")


# Three sequences of 9, 6 and 5 tokens fed as: step 1 = prefill seq0[:5], seq1 whole; step 2 = seq0[5:8]
# (a chunk attending to cache), seq1 decode... ; step 3 = decodes and a fresh prompt, all mixed.
STEPS = [
    [(0, 0, 5), (1, 0, 5)],
    [(0, 5, 3), (1, 5, 1), (2, 0, 4)],
    [(0, 8, 1), (2, 4, 1)],
]
LENGTHS = {0: 9, 1: 6, 2: 5}


def test_gqa_paged_attention_matches_dense():
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, scale = 4, 2, 8, 0.3
    seq_q = {s: torch.randn(n, heads, dim, generator=g) for s, n in LENGTHS.items()}
    seq_k = {s: torch.randn(n, kv_heads, dim, generator=g) for s, n in LENGTHS.items()}
    seq_v = {s: torch.randn(n, kv_heads, dim, generator=g) for s, n in LENGTHS.items()}
    attn = PagedAttention(heads, kv_heads, dim, scale)
    attn.kv_cache = torch.zeros(attn.kv_cache_shape(32, BLOCK))
    cache = Cache()
    outputs: dict[int, list[torch.Tensor]] = {s: [] for s in LENGTHS}
    for steps in STEPS:
        q = torch.cat([seq_q[s][a : a + n] for s, a, n in steps])
        k = torch.cat([seq_k[s][a : a + n] for s, a, n in steps])
        v = torch.cat([seq_v[s][a : a + n] for s, a, n in steps])
        out = attn(q, k, v, cache.batch(steps))
        for (s, _, _), piece in zip(steps, out.split([n for _, _, n in steps]), strict=True):
            outputs[s].append(piece)
    for s in LENGTHS:
        torch.testing.assert_close(
            torch.cat(outputs[s]), dense_causal(seq_q[s], seq_k[s], seq_v[s], scale), atol=1e-5, rtol=1e-5
        )


def test_gqa_without_cache_attends_within_the_step_and_rejects_history():
    attn = PagedAttention(2, 1, 4, 0.5)
    q, k, v = torch.randn(5, 2, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    out = attn(q, k, v, no_cache([3, 2]))
    torch.testing.assert_close(out[:3], dense_causal(q[:3], k[:3], v[:3], 0.5))
    torch.testing.assert_close(out[3:], dense_causal(q[3:], k[3:], v[3:], 0.5))
    decode = ForwardBatch.build(
        input_ids=[0], positions=[3], query_lens=[1], seq_lens=[4], block_tables=[[0]], block_size=BLOCK,
        device="cpu",
    )  # fmt: skip
    with pytest.raises(ValueError, match="no KV cache allocated"):
        attn(q[:1], k[:1], v[:1], decode)


def test_negative_slots_are_not_written():
    attn = PagedAttention(1, 1, 2, 1.0)
    attn.kv_cache = torch.zeros(attn.kv_cache_shape(2, BLOCK))
    batch = ForwardBatch.build(
        input_ids=[0, 0], positions=[0, 1], query_lens=[2], seq_lens=[2], block_tables=[[0]],
        block_size=BLOCK, slot_mapping=[0, -1], device="cpu",
    )  # fmt: skip
    attn(torch.ones(2, 1, 2), torch.ones(2, 1, 2), torch.ones(2, 1, 2), batch)
    assert attn.kv_cache[0].view(-1, 2)[0].tolist() == [1.0, 1.0]
    assert attn.kv_cache[0].view(-1, 2)[1:].abs().sum() == 0


def transformers_mla(mla: MLAttention, q_lora_rank: int | None):
    """The oracle: transformers' DeepseekV3Attention (eager, interleaved rope) holding `mla`'s weights."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    c = mla.config
    config = transformers.DeepseekV3Config(
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        rope_interleave=True,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    attention = hf.DeepseekV3Attention(config, layer_idx=0).eval()
    attention.load_state_dict(mla.state_dict(), strict=True)  # same parameter names, every one of them
    assert attention.scaling == pytest.approx(c.softmax_scale)
    rotary = hf.DeepseekV3RotaryEmbedding(config)

    def run(hidden: torch.Tensor) -> torch.Tensor:
        """One whole sequence [L, D], causal, positions 0..L-1."""
        length = hidden.shape[0]
        mask = torch.full((length, length), -math.inf).triu(1)[None, None]
        cos_sin = rotary(hidden[None], torch.arange(length)[None])
        with torch.no_grad():
            return attention(hidden[None], cos_sin, mask)[0][0]

    return run


@pytest.mark.parametrize("q_lora_rank", [None, 8])
@pytest.mark.parametrize("absorb", [True, False])
def test_mla_paged_matches_transformers(absorb, q_lora_rank):
    """MLA over the paged latent cache, fed in mixed prefill/chunk/decode steps, equals transformers'
    DeepseekV3Attention run on each whole sequence. The last step is decode-only, which uses the
    weight-absorbed latent attention when `absorb`."""
    torch.manual_seed(2)
    config = MLAConfig(32, 2, q_lora_rank, 16, 8, 4, 8, softmax_scale=12**-0.5)
    mla = MLAttention(config, RotaryEmbedding(4, 10000.0, interleaved=True))
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    oracle = transformers_mla(mla, q_lora_rank)
    hidden = {s: torch.randn(n, 32) for s, n in LENGTHS.items()}
    reference = {s: oracle(hidden[s]) for s in LENGTHS}
    mla.kv_cache = torch.zeros(mla.kv_cache_shape(32, BLOCK))
    mla.absorb_for_decode = absorb
    assert mla.kv_cache.shape == (32, BLOCK, 16 + 4)
    cache = Cache()
    outputs: dict[int, list[torch.Tensor]] = {s: [] for s in LENGTHS}
    for steps in STEPS:
        x = torch.cat([hidden[s][a : a + n] for s, a, n in steps])
        pos = torch.cat([torch.arange(a, a + n) for _, a, n in steps])
        out = mla(pos, x, cache.batch(steps))
        for (s, _, _), piece in zip(steps, out.split([n for _, _, n in steps]), strict=True):
            outputs[s].append(piece)
    for s in LENGTHS:
        torch.testing.assert_close(torch.cat(outputs[s]), reference[s], atol=1e-5, rtol=1e-5)


def test_mla_without_cache_matches_transformers():
    """A prefill-only step with no cache allocated (the profiling/warm-up path) attends within the step."""
    torch.manual_seed(3)
    config = MLAConfig(32, 2, None, 16, 8, 4, 8, softmax_scale=12**-0.5)
    mla = MLAttention(config, RotaryEmbedding(4, 10000.0, interleaved=True))
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    oracle = transformers_mla(mla, None)
    x = torch.randn(9, 32)
    out = mla(torch.cat([torch.arange(5), torch.arange(4)]), x, no_cache([5, 4]))
    torch.testing.assert_close(out[:5], oracle(x[:5]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[5:], oracle(x[5:]), atol=1e-5, rtol=1e-5)


def test_zero_tokens_skip_attention():
    attn = PagedAttention(2, 1, 4, 0.5)
    idle = no_cache([])
    assert idle.mode is ForwardMode.IDLE
    assert attn(torch.zeros(0, 2, 4), torch.zeros(0, 1, 4), torch.zeros(0, 1, 4), idle).shape == (0, 2, 4)
    mla = MLAttention(MLAConfig(32, 2, 8, 16, 8, 4, 8, softmax_scale=0.3), RotaryEmbedding(4, 10000.0))
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert mla(torch.zeros(0, dtype=torch.long), torch.zeros(0, 32), idle).shape == (0, 32)


def test_two_batches_alive_at_once_interleave_layers():
    """Two micro-batches (disjoint sequences, same caches) interleaved layer by layer, as two-batch overlap
    runs them, give what each gives alone: no per-step state lives outside the ForwardBatch."""
    torch.manual_seed(3)
    rotary = RotaryEmbedding(4, 10000.0, interleaved=True)
    config = MLAConfig(32, 2, None, 16, 8, 4, 8, softmax_scale=12**-0.5)
    layers = [MLAttention(config, rotary) for _ in range(2)]
    for layer in layers:
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.2)
    hidden = {s: torch.randn(n, 32) for s, n in LENGTHS.items()}
    micro = [[(0, 0, 9)], [(1, 0, 6), (2, 0, 5)]]

    def fresh_caches():
        for layer in layers:
            layer.kv_cache = torch.zeros(layer.kv_cache_shape(32, BLOCK))

    def inputs(steps):
        return torch.cat([hidden[s][a : a + n] for s, a, n in steps])

    fresh_caches()
    cache = Cache()
    alone = []
    for steps in micro:
        batch, x = cache.batch(steps), inputs(steps)
        for layer in layers:
            x = layer(batch.positions, x, batch)
        alone.append(x)
    fresh_caches()
    cache = Cache()
    batches = [cache.batch(steps) for steps in micro]
    xs = [inputs(steps) for steps in micro]
    for layer in layers:
        for i, batch in enumerate(batches):
            xs[i] = layer(batch.positions, xs[i], batch)
    for got, want in zip(xs, alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
