"""`moefleet bench --emulate-ep N`: one GPU doing the per-GPU work of an N-way expert-parallel deployment.

The model keeps its real width (attention, dense layers, shared experts, expert matrices) but each MoE layer
holds only the experts one GPU of the deployment holds, (E + redundant) / N, and receives the routed-row
volume one GPU receives there. With uniform routing, a GPU of an N-way group receives on average
tokens_per_gpu x top_k rows (every GPU sends that many, spread evenly), so `EmulatedEPDispatcher` keeps all
T x K (token, expert) hits of this GPU's own tokens and sends every one to a local expert: physical slot
p -> p mod (local experts). Same rows, same experts, no communication: the measured step is the deployment's
compute per GPU, and communication is added separately (`--comm-us-per-layer`, docs/benchmarks.md).

Example: DeepSeek-V3 decode at EP72 with 32 redundant experts: (256 + 32) / 72 = 4 experts per GPU; 256
tokens x top-8 = 2,048 rows per GPU per MoE layer, 512 per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from moefleet.engine.eplb.expert_location import check_expert_slots
from moefleet.engine.layers.token_dispatch import DispatchedTokens, LocalDispatcher


@dataclass(frozen=True, slots=True)
class EmulatedShape:
    """Per-GPU MoE work of an `ep_size`-way deployment (pure arithmetic, validated)."""

    ep_size: int
    num_experts: int  # logical routed experts
    num_redundant_experts: int
    top_k: int
    tokens_per_gpu: int

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"--emulate-ep ({self.ep_size}) must be >= 1")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be in [1, num_experts ({self.num_experts})]")
        if self.tokens_per_gpu < 0:
            raise ValueError(f"tokens_per_gpu ({self.tokens_per_gpu}) must be >= 0")
        check_expert_slots(self.num_experts, self.num_redundant_experts, self.ep_size)

    @property
    def physical_experts(self) -> int:
        return self.num_experts + self.num_redundant_experts

    @property
    def experts_per_gpu(self) -> int:
        return self.physical_experts // self.ep_size

    @property
    def rows_per_gpu(self) -> int:
        """Routed (token, expert) rows one GPU's experts compute per MoE layer (expected, uniform routing)."""
        return self.tokens_per_gpu * self.top_k

    @property
    def rows_per_expert(self) -> float:
        return self.rows_per_gpu / self.experts_per_gpu


def local_expert_ids(topk_ids: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """Physical slot ids [T, K] -> local expert ids (slot mod local experts); padding (-1) stays -1.

    On device, no host sync (CUDA-graph capturable)."""
    return torch.where(topk_ids >= 0, topk_ids % num_local_experts, topk_ids)


class EmulatedEPDispatcher:
    """A `TokenDispatcher` that routes every hit of this GPU's tokens to its local experts (see module doc)."""

    def __init__(self, num_local_experts: int):
        if num_local_experts < 1:
            raise ValueError(f"num_local_experts ({num_local_experts}) must be >= 1")
        self.num_local_experts = num_local_experts
        self._local = LocalDispatcher(num_local_experts)

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        return self._local.dispatch_start(
            hidden, local_expert_ids(topk_ids, self.num_local_experts), topk_weights, is_prefill=is_prefill
        )

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        return self._local.dispatch_finish(pending)

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        return self._local.combine_start(expert_output, dispatched)

    def combine_finish(self, pending: Any) -> torch.Tensor:
        return self._local.combine_finish(pending)


def install_emulated_dispatchers(model: torch.nn.Module, num_micro_batches: int = 1) -> int:
    """Give every MoE layer (built under the emulated topology) emulating dispatchers; returns the count."""
    from moefleet.engine.distributed.ep import moe_layers

    count = 0
    for _, layer in moe_layers(model):
        local = len(layer.experts.local_experts)  # type: ignore[union-attr,arg-type]
        dispatchers = [EmulatedEPDispatcher(local) for _ in range(num_micro_batches)]
        setattr(layer, "dispatchers", dispatchers)  # noqa: B010
        setattr(layer, "dispatcher", dispatchers[0])  # noqa: B010
        count += 1
    return count
