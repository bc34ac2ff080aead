"""Triton attention backend: attends directly over the paged KV cache (no [B, C_max] padded gather, no
host-built masks). Kernels: engine/kernels/paged_attention.py (GQA decode split-K, paged and varlen
prefill) and engine/kernels/mla_decode.py (MLA over the latent cache with absorbed weights); KV writes:
kv_write.py.

Per step (metadata built once, memoised on the batch):
- GQA: decode-only steps -> `paged_decode`; steps with prompt chunks -> `paged_prefill` over all rows
  (bottom-right causal, so decode rows in a mixed step are just query_len 1); no cache (warm-up) ->
  `varlen_prefill` within the step.
- MLA: decode rows (query_len 1 over a cache) -> `mla_decode` on the latent rows with W_UK folded into the
  query and W_UV into the output, also within a mixed step; extend rows gather only their own sequences'
  latent rows (packed varlen, built on the device), expand them through kv_b and run `varlen_prefill`.
A decode-only step reads nothing on the host, so it can be captured in a CUDA graph.
Shape legend: T new tokens, B sequences, H heads, Hk KV heads, R kv_lora_rank, Dr rope dim, S packed
context rows of the extend sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .backend import AttentionBackend
from .kv_write import store_rows

if TYPE_CHECKING:
    from moefleet.engine.forward_batch import ForwardBatch


def _kernels() -> Any:
    from moefleet.engine.kernels import paged_attention

    return paged_attention


def _mla_kernel() -> Any:
    from moefleet.engine.kernels.mla_decode import mla_decode

    return mla_decode


@dataclass
class SeqGroup:
    """A subset of the step's sequences (MLA decode rows or extend rows). Index tensors are None when the
    group is the whole step (no gather needed)."""

    seq_index: torch.Tensor | None  # [b] int64 sequences of the group
    row_index: torch.Tensor | None  # [t] int64 token rows of the group
    block_tables: torch.Tensor  # [b, M] int32
    seq_lens: torch.Tensor  # [b] int32
    cu_query_lens: torch.Tensor  # [b + 1] int32
    max_query_len: int
    max_seq_len: int
    # Extend groups: packed context of the group's sequences (cu_kv_lens [b + 1] int32, S rows).
    cu_kv_lens: torch.Tensor | None = None
    num_kv: int = 0
    # Every sequence of the group is a whole prompt in this step: its context is its own new rows.
    fresh: bool = False


@dataclass
class MLAMetadata:
    decode: SeqGroup | None
    extend: SeqGroup | None


def _prefix(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def seq_group(batch: ForwardBatch, picked: list[int], with_kv: bool) -> SeqGroup:
    """Device metadata of the sequences `picked` (host indices); one host->device copy per group."""
    device = batch.input_ids.device
    q_lens = [batch.query_lens[b] for b in picked]
    s_lens = [batch.seq_lens[b] for b in picked]
    whole = len(picked) == batch.num_seqs
    if whole:
        seq_index = row_index = None
        tables, seq_lens_t, cu_q = batch.block_tables, batch.seq_lens_t, batch.cu_query_lens
    else:
        starts = _prefix(batch.query_lens)
        rows = [r for b in picked for r in range(starts[b], starts[b + 1])]
        host = torch.tensor(picked + rows + _prefix(q_lens), dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        packed = host.to(device, non_blocking=True)
        seq_index, row_index, cu64 = packed.split([len(picked), len(rows), len(picked) + 1])
        tables, seq_lens_t, cu_q = batch.block_tables[seq_index], batch.seq_lens_t[seq_index], cu64.int()
    group = SeqGroup(
        seq_index=seq_index,
        row_index=row_index,
        block_tables=tables,
        seq_lens=seq_lens_t,
        cu_query_lens=cu_q,
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(s_lens, default=0),
        fresh=q_lens == s_lens,
    )
    if with_kv:
        cu_kv = torch.zeros(len(picked) + 1, dtype=torch.int32, device=device)
        torch.cumsum(seq_lens_t, 0, out=cu_kv[1:])
        group.cu_kv_lens, group.num_kv = cu_kv, sum(s_lens)
    return group


def context_slots(group: SeqGroup, block_size: int) -> torch.Tensor:
    """Flat cache slot of every context row of the group's sequences, packed [S] (built on the device)."""
    assert group.cu_kv_lens is not None
    device = group.seq_lens.device
    num = len(group.seq_lens)
    seq = torch.repeat_interleave(
        torch.arange(num, device=device), group.seq_lens.long(), output_size=group.num_kv
    )
    pos = torch.arange(group.num_kv, device=device) - group.cu_kv_lens[:-1].long()[seq]
    blocks = group.block_tables.long()[seq, pos // block_size]
    return blocks * block_size + pos % block_size


def mla_dims_supported(config: Any) -> bool:
    """Whether the Triton MLA kernels compile for these head dims (tensor-core dots need K >= 16)."""
    dims = (config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim)
    return all(d >= 16 and d % 16 == 0 for d in dims)


def _torch_fallback() -> AttentionBackend:
    from .torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def build_metadata(self, batch: ForwardBatch) -> Any:
        return None  # GQA reads the batch's own tensors; MLA's split is built by `mla_metadata`

    def mla_metadata(self, batch: ForwardBatch, cache_backed: bool, absorb: bool) -> MLAMetadata:
        def build() -> MLAMetadata:
            is_decode = [absorb and cache_backed and q == 1 for q in batch.query_lens]
            dec = [b for b, d in enumerate(is_decode) if d]
            ext = [b for b, d in enumerate(is_decode) if not d]
            return MLAMetadata(
                decode=seq_group(batch, dec, with_kv=False) if dec else None,
                extend=seq_group(batch, ext, with_kv=True) if ext else None,
            )

        return batch.memo(("triton_mla", cache_backed, absorb), build)

    @staticmethod
    def _max_seq_hint(batch: ForwardBatch, max_seq_len: int) -> int | None:
        """Host hint for the kernels' split count: the live longest sequence in eager steps; for a CUDA
        graph None (the block table's capacity: one captured graph serves every length)."""
        return None if batch.for_cuda_graph else max(max_seq_len, 1)

    # ---- GQA ------------------------------------------------------------------------------------------

    def forward_gqa(
        self,
        layer: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from moefleet.engine.forward_batch import ForwardMode

        kernels = _kernels()
        num_tokens = q.shape[0]
        local = {
            "sinks": None if sinks is None else sinks.float().contiguous(),
            "sliding_window": getattr(layer, "sliding_window", None),
        }
        if layer.kv_cache.numel() == 0:
            if batch.query_lens != batch.seq_lens:
                raise ValueError("attention has no KV cache allocated, so seq_lens must equal query_lens")
            return kernels.varlen_prefill(
                q,
                k,
                v,
                batch.cu_query_lens,
                batch.cu_query_lens,
                layer.scale,
                max_query_len=batch.max_query_len,
                **local,
            )
        k_cache, v_cache = layer.kv_cache[0], layer.kv_cache[1]  # [N, bs, Hk, D]
        store_rows(k_cache.view(-1, k_cache[0, 0].numel()), k.reshape(num_tokens, -1), batch.slot_mapping)
        store_rows(v_cache.view(-1, v_cache[0, 0].numel()), v.reshape(num_tokens, -1), batch.slot_mapping)
        if batch.mode is ForwardMode.DECODE:
            return kernels.paged_decode(
                q, k_cache, v_cache, batch.block_tables, batch.seq_lens_t, layer.scale,
                max_seq_len=self._max_seq_hint(batch, batch.max_seq_len), **local,
            )  # fmt: skip
        return kernels.paged_prefill(
            q, k_cache, v_cache, batch.block_tables, batch.cu_query_lens, batch.seq_lens_t, layer.scale,
            max_query_len=batch.max_query_len, **local,
        )  # fmt: skip

    # ---- MLA ------------------------------------------------------------------------------------------

    def forward_mla(
        self,
        layer: Any,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        entry: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        c = layer.config
        if q_nope.is_cuda and not mla_dims_supported(c):  # the CPU interpreter has no such limit
            # tl.dot needs every reduced dimension >= 16 (real checkpoints: 512 / 64 / 128); tiny test models
            # with smaller MLA dims run the reference path (not capturable: CUDA graphs then stay off).
            return _torch_fallback().forward_mla(layer, q_nope, q_pe, entry, batch)
        cache_backed = layer.kv_cache.numel() > 0
        flat = layer.kv_cache.view(-1, layer.kv_cache.shape[-1]) if cache_backed else entry
        if cache_backed:
            store_rows(flat, entry, batch.slot_mapping)
        elif batch.query_lens != batch.seq_lens:
            raise ValueError("attention has no KV cache allocated, so seq_lens must equal query_lens")
        meta = self.mla_metadata(batch, cache_backed, layer.absorb_for_decode)
        parts: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        if meta.decode is not None:
            g = meta.decode
            qn, qp = (q_nope, q_pe) if g.row_index is None else (q_nope[g.row_index], q_pe[g.row_index])
            out_latent = _mla_kernel()(
                layer.absorb_query(qn), qp.contiguous(), layer.kv_cache, g.block_tables, g.seq_lens,
                c.softmax_scale, kv_lora_rank=c.kv_lora_rank, max_seq_len=self._max_seq_hint(batch, g.max_seq_len),
            )  # fmt: skip
            parts.append((g.row_index, layer.absorb_output(out_latent)))
        if meta.extend is not None:
            g = meta.extend
            qn, qp = (q_nope, q_pe) if g.row_index is None else (q_nope[g.row_index], q_pe[g.row_index])
            if g.fresh:  # whole prompts: the context is the step's own rows (no gather from the cache)
                context = entry if g.row_index is None else entry[g.row_index]
            else:
                context = flat[context_slots(g, batch.block_size)].to(q_nope.dtype)  # [S, R + Dr]
            latent, k_pe = context.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
            k_nope, values = layer.expand_latent(latent)  # [S, H, Dn], [S, H, Dv]: views of kv_b's output
            k_rope = k_pe[:, None, :].expand(-1, c.num_heads, -1)  # one rope key per token: head stride 0
            assert g.cu_kv_lens is not None
            # read q_pe and the shared rope key in place (no concatenation) where the kernel's split allows
            if _kernels().rope_split_supported(c.qk_nope_head_dim, c.qk_rope_head_dim):
                out = _kernels().varlen_prefill(
                    qn, k_nope, values, g.cu_query_lens, g.cu_kv_lens, c.softmax_scale,
                    max_query_len=g.max_query_len, q_rope=qp, k_rope=k_rope,
                )  # fmt: skip
            else:
                out = _kernels().varlen_prefill(
                    torch.cat([qn, qp], dim=-1), torch.cat([k_nope, k_rope], dim=-1), values.contiguous(),
                    g.cu_query_lens, g.cu_kv_lens, c.softmax_scale, max_query_len=g.max_query_len,
                )  # fmt: skip
            parts.append((g.row_index, out))
        if len(parts) == 1:
            return parts[0][1]
        out = q_nope.new_empty(q_nope.shape[0], c.num_heads, c.v_head_dim)
        for rows, values in parts:
            out[rows] = values
        return out

    # ---- CUDA graphs ----------------------------------------------------------------------------------
    # A decode step reads only the batch's device tensors (block_tables, seq_lens, slot_mapping), which the
    # graph runner keeps in static buffers; split counts follow the static block table's width. Nothing
    # else needs preparing per capture or replay.

    def init_cuda_graph_state(
        self, max_batch_size: int, max_blocks_per_seq: int, device: torch.device
    ) -> None:
        return None

    def init_forward_metadata_capture(self, batch: ForwardBatch) -> None:
        return None

    def init_forward_metadata_replay(self, batch: ForwardBatch) -> None:
        return None
