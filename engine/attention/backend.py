"""AttentionBackend: the one seam between attention layers and attention kernels.

A backend owns the paged KV cache writes and reads of a step, for GQA (`PagedAttention`) and MLA
(`MLAttention`). Layers hand it roped q/k/v (GQA) or the query halves and the new latent rows (MLA); the
backend writes the cache and attends over pages. Metadata is built once per step by
`init_forward_metadata(batch)` and memoised on the batch (never on the backend: two batches may be alive
at once). CUDA-graph hooks: `init_cuda_graph_state` preallocates what a captured decode step reads,
`init_forward_metadata_capture` / `_replay` fill it for a padded batch size.

Implementations: torch_backend.py (padded-SDPA reference, exact, CPU default) and triton_backend.py
(paged Triton kernels, no padded gather, no host-built masks).
Shape legend: T new tokens, H query heads, Hk KV heads, D head dim, R kv_lora_rank, Dr rope dim, Dv value dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moefleet.engine.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    name: str = "?"
    # Whether a decode step through this backend can be captured in a CUDA graph.
    supports_cuda_graphs: bool = False

    def init_forward_metadata(self, batch: ForwardBatch) -> Any:
        """Metadata of `batch` for this backend, built once per step (memoised on the batch)."""
        return batch.memo(("attn_metadata", self.name), lambda: self.build_metadata(batch))

    @abstractmethod
    def build_metadata(self, batch: ForwardBatch) -> Any: ...

    @abstractmethod
    def forward_gqa(
        self,
        layer: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write k/v [T, Hk, D] into `layer.kv_cache` ([2, N, bs, Hk, D]; empty = attend within the step),
        then attend with q [T, H, D] -> [T, H, Dv]. `layer.sliding_window` (None = full causal): the query
        at position p sees keys p - W < j <= p; `sinks` [H]: per-head logits added to each softmax."""

    @abstractmethod
    def forward_mla(
        self,
        layer: Any,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        entry: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Write entry [T, R + Dr] (latent + roped shared key) into `layer.kv_cache` ([N, bs, R + Dr]);
        attend with q_nope [T, H, Dn] and q_pe [T, H, Dr] -> [T, H, Dv]. Decode rows (one new token over a
        cache) attend in latent space (`layer.absorb_query` / `layer.absorb_output`); only extend rows
        expand their context through kv_b (`layer.expand_latent`)."""

    # ---- CUDA graphs (decode) -------------------------------------------------------------------------

    def init_cuda_graph_state(
        self, max_batch_size: int, max_blocks_per_seq: int, device: torch.device
    ) -> None:
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def init_forward_metadata_capture(self, batch: ForwardBatch) -> None:
        """Before capturing `batch` (a padded decode batch over the graph's static buffers)."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def init_forward_metadata_replay(self, batch: ForwardBatch) -> None:
        """Before replaying: the static buffers already hold the live batch (padded)."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")
