"""Mixture-of-Experts layer: route -> logical->physical map -> dispatch -> experts -> combine (+ shared).

The layer never talks to process groups: `self.dispatcher` (a `TokenDispatcher`) decides where rows go.
By default it is a `LocalDispatcher` over this rank's experts, which is right for a single rank;
`moefleet.engine.distributed` installs an expert-parallel dispatcher from outside.
Experts are placed in P = E + N physical slots (N redundant, `Topology.num_redundant_experts`);
this rank holds slots [rank * P/W, (rank+1) * P/W), `experts.local_experts` names the logical expert of
each. `logical_to_physical` [E, R] (-1 padded) and `logical_replicas` [E] are buffers EPLB rewrites in
place (`set_placement`); the replica of each (token, expert) is chosen on device (`choose_replicas`).
Works with T = 0 tokens: idle data-parallel ranks still run the layer so collectives line up.
Shape legend: T tokens, D hidden, K top-k, E experts (logical), R max replicas, N dispatched rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from moefleet.engine import topology
from moefleet.engine.eplb.expert_location import ExpertLocation, check_expert_slots, choose_replicas
from moefleet.engine.layers.experts import Experts
from moefleet.engine.layers.router import Router, RoutingConfig
from moefleet.engine.layers.token_dispatch import LocalDispatcher, TokenDispatcher
from torch import nn


class MoE(nn.Module):
    logical_to_physical: torch.Tensor  # [E, R] logical -> physical slots (-1 padded); EPLB rewrites in place
    logical_replicas: torch.Tensor  # [E] replicas per logical expert

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        routing: RoutingConfig,
        shared_experts: nn.Module | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.gate = Router(hidden_size, routing)
        layout = topology.current()
        self.ep_size, self.ep_rank = layout.ep_size, layout.ep_rank
        # 0: one node (a node preference would add nothing over "any replica").
        self.ranks_per_node = layout.ranks_per_node if 0 < layout.ranks_per_node < layout.ep_size else 0
        num_experts, redundant = routing.num_experts, layout.num_redundant_experts
        self.slots_per_rank = check_expert_slots(num_experts, redundant, layout.ep_size)
        location = ExpertLocation.initial(1, num_experts, redundant, layout.ep_size)
        local = location.local_slots(0, layout.ep_rank)
        self.experts = Experts(local, hidden_size, intermediate_size)
        self.shared_experts = shared_experts
        log2phy, replicas = location.layer_tensors(0)
        self.register_buffer("logical_to_physical", log2phy, persistent=False)
        self.register_buffer("logical_replicas", replicas, persistent=False)
        self.dispatcher: TokenDispatcher = LocalDispatcher(len(self.experts.local_experts))
        # EPLB's recorder assigns an int64 tensor [E]; routed (token, logical expert) hits are added on device.
        self.expert_load: torch.Tensor | None = None

    def set_placement(self, log2phy: torch.Tensor, replicas: torch.Tensor) -> None:
        """Replace the maps in place (same shapes, so captured CUDA graphs stay valid)."""
        self.logical_to_physical.copy_(log2phy)
        self.logical_replicas.copy_(replicas)

    def forward(self, hidden: torch.Tensor, is_prefill: bool | None = None) -> torch.Tensor:
        """hidden [T, D] -> [T, D]: the four stages in order (two-batch overlap interleaves them instead).
        `is_prefill`: the step's group-agreed mode (`ForwardBatch.is_prefill`), passed to the dispatcher."""
        step = self.stage_route(hidden)
        self.stage_dispatch(step, self.dispatcher, is_prefill=is_prefill)
        self.stage_experts(step, self.dispatcher)
        return self.stage_combine(step, self.dispatcher)

    def local_topk_path(
        self, hidden: torch.Tensor, dispatcher: TokenDispatcher, *, is_prefill: bool | None = None
    ) -> bool:
        """Whether the stages may skip the dispatcher: CUDA, the single-rank LocalDispatcher, and the plain
        layer and experts (variants with input scaling, biases or other activations keep the dispatcher).
        Then the fused kernel reads token rows by top-k id and applies the routing weights in its epilogue:
        no permutation, sort, gather or index_add (~0.1 ms per Qwen3 layer at 256 decode tokens, H200).
        A prefill-mode step whose FP8 experts take the per-expert cuBLAS path (`Experts.host_count_path`)
        keeps the dispatcher: grouped rows and host counts are what that path needs."""
        if not (
            hidden.is_cuda
            and type(dispatcher) is LocalDispatcher
            and type(self) is MoE
            and type(self.experts) is Experts
        ):
            return False
        rows = hidden.shape[0] * self.gate.config.top_k
        return not (is_prefill and self.experts.host_count_path(hidden.device, rows))

    # ---- stages, split at the two communications (engine/tbo.py interleaves two micro-batches' stages) -----

    def stage_route(self, hidden: torch.Tensor) -> MoEStep:
        """Compute: router, top-k, logical -> physical replica (and the EPLB load count)."""
        topk_weights, logical_ids = self.gate(hidden)  # [T, K] each
        return self.route_chosen(hidden, topk_weights, logical_ids)

    def route_chosen(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, logical_ids: torch.Tensor
    ) -> MoEStep:
        """`stage_route` after the gate: logical -> physical replica of the chosen experts (and the EPLB load)."""
        if self.ep_size > 1 and isinstance(self.dispatcher, LocalDispatcher):
            raise RuntimeError(
                f"expert-parallel size is {self.ep_size} but this MoE layer still has the single-rank "
                "LocalDispatcher: install an expert-parallel dispatcher (moefleet.engine.distributed) first"
            )
        physical_ids = choose_replicas(
            logical_ids,
            self.logical_to_physical,
            self.logical_replicas,
            self.ep_rank,
            self.slots_per_rank,
            self.ranks_per_node,
        )
        if self.expert_load is not None:
            flat = logical_ids.flatten()
            self.expert_load.index_add_(0, flat, torch.ones_like(flat, dtype=self.expert_load.dtype))
        return MoEStep(hidden, hidden, topk_weights, physical_ids)

    def stage_dispatch(
        self, step: MoEStep, dispatcher: TokenDispatcher, *, is_prefill: bool | None = None
    ) -> None:
        """Communication: launch the dispatch (an all-to-all dispatcher blocks here on the receive counts).
        `is_prefill` is this micro-batch's group-agreed step mode (`ForwardBatch.is_prefill`); the dispatcher
        picks per-mode kernels from it (DeepEP)."""
        step.is_prefill = is_prefill
        if self.local_topk_path(step.dispatch_input, dispatcher, is_prefill=is_prefill):
            step.local = True  # nothing to move: the experts read the rows in place (stage_experts)
            return
        step.pending = dispatcher.dispatch_start(
            step.dispatch_input, step.physical_ids, step.topk_weights, is_prefill=is_prefill
        )

    def stage_experts(self, step: MoEStep, dispatcher: TokenDispatcher) -> None:
        """Compute: wait for the rows, run the experts, launch the combine, then the shared experts (which
        run while the combine is in flight)."""
        if step.local:
            step.pending = self.experts.forward_topk(
                step.dispatch_input, step.physical_ids, step.topk_weights
            )
            step.shared = self.shared_output(step.hidden)
            return
        dispatched = dispatcher.dispatch_finish(step.pending)
        expert_out = self.experts(
            dispatched.hidden,
            dispatched.tokens_per_expert,
            counts=dispatched.counts,
            scales=dispatched.scales,
            expected_rows=dispatched.expected_rows,
            host_sync_ok=bool(step.is_prefill),
            host_counts=dispatched.host_counts,
        )
        step.pending = dispatcher.combine_start(expert_out, dispatched)
        step.shared = self.shared_output(step.hidden)

    def stage_combine(self, step: MoEStep, dispatcher: TokenDispatcher) -> torch.Tensor:
        """Communication: wait for the combine; returns the layer output [T, D]."""
        out = step.pending if step.local else dispatcher.combine_finish(step.pending)
        step.pending = None
        return out if step.shared is None else out + step.shared

    def shared_output(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Shared experts on the layer input (None without them)."""
        return self.shared_experts(hidden) if self.shared_experts is not None else None


@dataclass(eq=False)
class MoEStep:
    """One micro-batch's state between the stages of one MoE layer (handles belong to its dispatcher)."""

    hidden: torch.Tensor  # [T, D] layer input (shared experts read it)
    dispatch_input: torch.Tensor  # [T, D] rows sent to the experts
    topk_weights: torch.Tensor  # [T, K]
    physical_ids: torch.Tensor  # [T, K]
    pending: Any = None  # the dispatcher's handle; on the local top-k path, the experts' weighted output
    shared: torch.Tensor | None = None
    local: bool = False  # the single-rank CUDA path (MoE.local_topk_path): no dispatcher involved
    is_prefill: bool | None = None  # the step's group-agreed mode (host counts may be read in prefill)
