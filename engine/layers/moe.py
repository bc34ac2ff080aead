"""Mixture-of-Experts layer: route -> logical->physical map -> dispatch -> experts -> combine (+ shared).

The layer never talks to process groups: `self.dispatcher` (a `TokenDispatcher`) decides where rows go.
By default it is a `LocalDispatcher` over this rank's experts, which is right for a single rank;
`moefleet.engine.distributed` installs an expert-parallel dispatcher from outside.
`logical_to_physical` is a buffer (identity until EPLB replaces its contents in place).
Works with T = 0 tokens: idle data-parallel ranks still run the layer so collectives line up.
Shape legend: T tokens, D hidden, K top-k, E experts (logical), N dispatched rows.
"""

from __future__ import annotations

import torch
from moefleet.engine import parallel_layout
from moefleet.engine.layers.experts import Experts
from moefleet.engine.layers.router import Router, RoutingConfig
from moefleet.engine.layers.token_dispatch import LocalDispatcher, TokenDispatcher
from torch import nn


class MoE(nn.Module):
    logical_to_physical: torch.Tensor  # [E] logical -> physical expert id; EPLB rewrites it in place

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
        layout = parallel_layout.current()
        self.ep_size = layout.ep_size
        self.experts = Experts(layout.local_experts(routing.num_experts), hidden_size, intermediate_size)
        self.shared_experts = shared_experts
        self.register_buffer("logical_to_physical", torch.arange(routing.num_experts), persistent=False)
        self.dispatcher: TokenDispatcher = LocalDispatcher(len(self.experts.local_experts))
        # EPLB's recorder assigns an int64 tensor [num physical experts]; routed hits are added on device.
        self.expert_load: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, D] -> [T, D]."""
        if self.ep_size > 1 and isinstance(self.dispatcher, LocalDispatcher):
            raise RuntimeError(
                f"expert-parallel size is {self.ep_size} but this MoE layer still has the single-rank "
                "LocalDispatcher: install an expert-parallel dispatcher (moefleet.engine.distributed) first"
            )
        topk_weights, logical_ids = self.gate(hidden)  # [T, K] each
        physical_ids = self.logical_to_physical[logical_ids]
        if self.expert_load is not None:
            flat = physical_ids.flatten()
            self.expert_load.index_add_(0, flat, torch.ones_like(flat, dtype=self.expert_load.dtype))
        pending = self.dispatcher.dispatch_start(hidden, physical_ids, topk_weights)
        dispatched = self.dispatcher.dispatch_finish(pending)
        expert_out = self.experts(dispatched.hidden, dispatched.tokens_per_expert)
        pending = self.dispatcher.combine_start(expert_out, dispatched)
        # Shared experts run while the combine is in flight.
        shared = self.shared_experts(hidden) if self.shared_experts is not None else None
        out = self.dispatcher.combine_finish(pending)
        return out if shared is None else out + shared
