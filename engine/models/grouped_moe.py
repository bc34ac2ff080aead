"""The feed-forward block of the DeepSeek-V3 family (DeepSeek-V3/R1, Kimi-K2, GLM-4.5): grouped top-k routing
over routed experts plus always-on shared experts on sparse layers, a dense gated MLP on the others."""

from __future__ import annotations

from typing import Protocol

from moefleet.engine.layers.mlp import GatedMLP
from moefleet.engine.layers.moe import MoE
from moefleet.engine.layers.router import RoutingConfig
from torch import nn


class GroupedMoEConfig(Protocol):
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    n_group: int
    topk_group: int
    routed_scaling_factor: float

    def is_moe_layer(self, layer: int) -> bool: ...


def feed_forward(c: GroupedMoEConfig, layer: int, *, scoring: str, correction_bias: bool) -> nn.Module:
    """Layer `layer`'s MLP: the routed + shared experts where `c.is_moe_layer(layer)`, else a dense MLP."""
    if not c.is_moe_layer(layer):
        return GatedMLP(c.hidden_size, c.intermediate_size)
    routing = RoutingConfig(
        num_experts=c.n_routed_experts,
        top_k=c.num_experts_per_tok,
        scoring=scoring,
        norm_topk_prob=c.norm_topk_prob,
        n_group=c.n_group,
        topk_group=c.topk_group,
        routed_scaling_factor=c.routed_scaling_factor,
        correction_bias=correction_bias,
    )
    shared = (
        GatedMLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else None
    )
    return MoE(c.hidden_size, c.moe_intermediate_size, routing, shared_experts=shared)
