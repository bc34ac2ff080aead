"""Reference attention backend: paged causal attention through padded `scaled_dot_product_attention`.

The step's new tokens of all sequences are concatenated ([T, ...]). For sequence b with query_len q and
seq_len c (cached + new), its query i sits at position c - q + i and attends to KV slots 0..c-q+i, read
through its block table. This backend pads the batch to [B, Q_max] queries and [B, C_max] keys (index maps
built on the host, once per step) and runs one masked SDPA: exact against transformers, slow on a GPU (the
Triton backend attends over pages instead). Its building blocks (`build_padded_batch`, `paged_attention`,
`write_slots`) are public so model families with their own attention variants can reuse them.
Shape legend: T new tokens, B sequences, H query heads, Hk KV heads, D head dim, C_max longest context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from .backend import AttentionBackend

if TYPE_CHECKING:
    from moefleet.engine.forward_batch import ForwardBatch


class SeqLayout(Protocol):
    """What the padded index maps read (a ForwardBatch, or a subset of its sequences)."""

    query_lens: list[int]
    seq_lens: list[int]
    block_tables_cpu: torch.Tensor
    block_size: int


@dataclass
class SeqSubset:
    query_lens: list[int]
    seq_lens: list[int]
    block_tables_cpu: torch.Tensor
    block_size: int


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


def build_padded_batch(batch: SeqLayout, device: torch.device, cache_backed: bool) -> PaddedBatch:
    """Index maps for one step. `cache_backed=False` reads keys from the step's own tokens (no cache yet)."""
    query_lens = torch.tensor(batch.query_lens, dtype=torch.long)
    context_lens = torch.tensor(batch.seq_lens, dtype=torch.long)
    num_seqs = len(batch.query_lens)
    if num_seqs != len(batch.seq_lens):
        raise ValueError(f"query_lens ({num_seqs}) and seq_lens ({len(batch.seq_lens)}) differ in length")
    if bool((query_lens > context_lens).any()) or bool((query_lens < 1).any()):
        raise ValueError(
            f"need 1 <= query_len <= seq_len per sequence, got {batch.query_lens} / {batch.seq_lens}"
        )
    max_query = int(query_lens.max())
    max_context = int(context_lens.max())
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), query_lens)  # [T]
    starts = torch.cumsum(query_lens, 0) - query_lens
    index_in_seq = torch.arange(int(query_lens.sum())) - starts[seq_of_token]
    query_dest = seq_of_token * max_query + index_in_seq

    key_pos = torch.arange(max_context)[None, :]  # [1, C_max]
    if cache_backed:
        block_tables = batch.block_tables_cpu.to("cpu", torch.long)
        block_index = (key_pos // batch.block_size).expand(num_seqs, -1)
        needed_blocks = (max_context + batch.block_size - 1) // batch.block_size
        if block_tables.shape[1] < needed_blocks:
            raise ValueError(
                f"block_tables has {block_tables.shape[1]} columns, contexts need {needed_blocks}"
            )
        blocks = torch.gather(block_tables, 1, block_index)
        kv_source = blocks * batch.block_size + key_pos % batch.block_size
    else:
        if bool((query_lens != context_lens).any()):
            raise ValueError("attention has no KV cache allocated, so seq_lens must equal query_lens")
        kv_source = starts[:, None] + key_pos
    key_valid = key_pos < context_lens[:, None]  # [B, C_max]
    kv_source = torch.where(key_valid, kv_source, torch.zeros_like(kv_source))
    if bool((kv_source < 0).any()):
        raise ValueError("a block table entry needed by a context is -1 (unallocated)")
    query_pos = (context_lens - query_lens)[:, None] + torch.arange(max_query)[None, :]  # [B, Q_max]
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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PaddedBatch,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D]; k [B, C_max, Hk, D] and v [B, C_max, Hk, Dv] gathered per sequence -> [T, H, Dv].

    The H / Hk query heads sharing a KV head are folded into the query axis, so keys and values are never
    repeated per head (MLA's latent attention has Hk = 1 and H = 128). `sinks` [H] (gpt-oss): one logit per
    head joins each softmax and takes probability mass but adds no value.
    """
    num_tokens, num_heads, dim = q.shape
    num_seqs, max_query, num_kv_heads = batch.num_seqs, batch.max_query, k.shape[2]
    rep = num_heads // num_kv_heads
    padded = q.new_zeros(num_seqs * max_query, num_heads, dim)
    padded[batch.query_dest] = q
    if batch.fresh_prefill and sinks is None:
        # Padded query rows only see padded keys past their own sequence; their output is dropped.
        qp = padded.view(num_seqs, max_query, num_heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qp, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=rep > 1
        )
        return out.transpose(1, 2).reshape(num_seqs * max_query, num_heads, -1)[batch.query_dest]
    # [B, Q, Hk, rep, D] -> [B, Hk, Q * rep, D]; row q * rep + r is query q of head hk * rep + r.
    qp = padded.view(num_seqs, max_query, num_kv_heads, rep, dim).permute(0, 2, 1, 3, 4)
    qp = qp.reshape(num_seqs, num_kv_heads, max_query * rep, dim)
    mask = batch.mask[:, :, :, None, :].expand(-1, -1, -1, rep, -1).reshape(num_seqs, 1, max_query * rep, -1)
    if sinks is None:
        out = F.scaled_dot_product_attention(
            qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
        )
    else:
        scores = torch.matmul(qp, k.permute(0, 2, 3, 1)).float() * scale  # [B, Hk, Q * rep, C]
        scores = scores.masked_fill(~mask, float("-inf"))
        sink = sinks.float().view(1, num_kv_heads, 1, rep, 1).expand(num_seqs, -1, max_query, -1, -1)
        probs = torch.softmax(torch.cat([scores, sink.reshape(num_seqs, num_kv_heads, -1, 1)], -1), -1)
        out = torch.matmul(probs[..., :-1].to(v.dtype), v.transpose(1, 2))  # [B, Hk, Q * rep, Dv]
    out = out.view(num_seqs, num_kv_heads, max_query, rep, -1).permute(0, 2, 1, 3, 4)
    return out.reshape(num_seqs * max_query, num_heads, -1)[batch.query_dest]


def window_mask(batch: SeqLayout, padded: PaddedBatch, sliding_window: int) -> PaddedBatch:
    """`padded` with each real query row at position p narrowed to keys p - W < j <= p (padded rows keep
    the full mask, so no softmax row is all masked)."""
    query_lens = torch.tensor(batch.query_lens, dtype=torch.long)
    seq_lens = torch.tensor(batch.seq_lens, dtype=torch.long)
    query_index = torch.arange(padded.max_query)[None, :]  # [1, Q_max]
    query_pos = (seq_lens - query_lens)[:, None] + query_index  # [B, Q_max]
    key_pos = torch.arange(padded.mask.shape[-1])[None, None, :]  # [1, 1, C_max]
    keep = key_pos > query_pos[:, :, None] - sliding_window
    real_row = (query_index < query_lens[:, None])[:, :, None]
    mask = padded.mask & (keep | ~real_row)[:, None].to(padded.mask.device)
    return replace(padded, mask=mask, fresh_prefill=False)


def padded_batch_for(batch: ForwardBatch, device: torch.device, cache_backed: bool) -> PaddedBatch:
    """`build_padded_batch`, computed once per step and shared by all layers (memoised on the batch)."""
    return batch.memo(
        ("padded_batch", str(device), cache_backed), lambda: build_padded_batch(batch, device, cache_backed)
    )


def slot_rows(batch: ForwardBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the step's tokens that have a KV slot, their slots), once per step: slots < 0 (padding
    tokens) are skipped. Shared by all layers, so the mask -> index sync happens once, not per layer."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        slots = batch.slot_mapping.to(device, torch.long)
        rows = torch.nonzero(slots >= 0).squeeze(1)
        return rows, slots[rows]

    return batch.memo(("slot_rows", str(device)), build)


def write_slots(flat_cache: torch.Tensor, batch: ForwardBatch, values: torch.Tensor) -> None:
    """flat_cache [S, ...][slot] = values [T, ...] for the step's slot_mapping, skipping slots < 0."""
    rows, slots = slot_rows(batch, flat_cache.device)
    flat_cache[slots] = values[rows].to(flat_cache.dtype)


@dataclass
class MLASplit:
    """MLA rows of one step: decode rows attend in latent space, extend rows expand through kv_b.
    A group is None when empty; `rows` is None when the group is the whole step."""

    decode: tuple[torch.Tensor | None, PaddedBatch] | None
    extend: tuple[torch.Tensor | None, PaddedBatch] | None


def decode_seq_mask(batch: ForwardBatch, cache_backed: bool, absorb: bool) -> list[bool]:
    """Which sequences take MLA's latent (absorbed) path: one new token over an allocated cache."""
    return [absorb and cache_backed and q == 1 for q in batch.query_lens]


def _subset(
    batch: ForwardBatch, picked: list[int], device: torch.device, cache_backed: bool
) -> tuple[torch.Tensor, PaddedBatch]:
    starts = [0]
    for q in batch.query_lens:
        starts.append(starts[-1] + q)
    rows = [r for b in picked for r in range(starts[b], starts[b + 1])]
    sub = SeqSubset(
        query_lens=[batch.query_lens[b] for b in picked],
        seq_lens=[batch.seq_lens[b] for b in picked],
        block_tables_cpu=batch.block_tables_cpu[picked],
        block_size=batch.block_size,
    )
    return torch.tensor(rows, dtype=torch.long, device=device), build_padded_batch(sub, device, cache_backed)


def mla_split(batch: ForwardBatch, device: torch.device, cache_backed: bool, absorb: bool) -> MLASplit:
    def build() -> MLASplit:
        is_decode = decode_seq_mask(batch, cache_backed, absorb)
        if all(is_decode):
            return MLASplit(decode=(None, padded_batch_for(batch, device, cache_backed)), extend=None)
        if not any(is_decode):
            return MLASplit(decode=None, extend=(None, padded_batch_for(batch, device, cache_backed)))
        dec = [b for b, d in enumerate(is_decode) if d]
        ext = [b for b, d in enumerate(is_decode) if not d]
        return MLASplit(
            decode=_subset(batch, dec, device, cache_backed), extend=_subset(batch, ext, device, cache_backed)
        )

    return batch.memo(("mla_split", str(device), cache_backed, absorb), build)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, batch: ForwardBatch) -> None:
        return None  # built lazily per (device, cache) by the helpers above, memoised on the batch

    def forward_gqa(
        self,
        layer: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cache_backed = layer.kv_cache.numel() > 0
        padded = padded_batch_for(batch, q.device, cache_backed)
        window = getattr(layer, "sliding_window", None)
        if window is not None:
            base = padded
            padded = batch.memo(
                ("window", str(q.device), cache_backed, window), lambda: window_mask(batch, base, window)
            )
        if cache_backed:
            k_flat = layer.kv_cache[0].view(-1, layer.num_kv_heads, layer.head_dim)
            v_flat = layer.kv_cache[1].view(-1, layer.num_kv_heads, layer.head_dim)
            write_slots(k_flat, batch, k)
            write_slots(v_flat, batch, v)
        else:
            k_flat, v_flat = k, v
        keys, values = k_flat[padded.kv_source], v_flat[padded.kv_source]  # [B, C_max, Hk, D]
        return paged_attention(q, keys.to(q.dtype), values.to(q.dtype), padded, layer.scale, sinks)

    def forward_mla(
        self,
        layer: Any,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        entry: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        c = layer.config
        cache_backed = layer.kv_cache.numel() > 0
        if cache_backed:
            flat = layer.kv_cache.view(-1, layer.kv_cache.shape[-1])
            write_slots(flat, batch, entry)
        else:
            flat = entry
        split = mla_split(batch, q_nope.device, cache_backed, layer.absorb_for_decode)
        parts: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        if split.decode is not None:
            rows, padded = split.decode
            qn, qp = (q_nope, q_pe) if rows is None else (q_nope[rows], q_pe[rows])
            context = flat[padded.kv_source].to(q_nope.dtype)  # [B, C_max, R + Dr]
            queries = torch.cat([layer.absorb_query(qn), qp], dim=-1)  # [t, H, R + Dr]
            keys = context[:, :, None, :]
            out_latent = paged_attention(queries, keys, keys[..., : c.kv_lora_rank], padded, c.softmax_scale)
            parts.append((rows, layer.absorb_output(out_latent)))
        if split.extend is not None:
            rows, padded = split.extend
            qn, qp = (q_nope, q_pe) if rows is None else (q_nope[rows], q_pe[rows])
            context = flat[padded.kv_source].to(q_nope.dtype)
            latent, k_pe = context.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
            k_nope, values = layer.expand_latent(latent)  # [B, C_max, H, Dn], [B, C_max, H, Dv]
            keys = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, c.num_heads, -1)], dim=-1)
            out = paged_attention(torch.cat([qn, qp], dim=-1), keys, values, padded, c.softmax_scale)
            parts.append((rows, out))
        if len(parts) == 1:
            return parts[0][1]
        out = q_nope.new_empty(q_nope.shape[0], c.num_heads, c.v_head_dim)
        for rows, values in parts:
            out[rows] = values
        return out
