"""MoE layers of the emerging families, on the same `MoE` pipeline (route -> logical->physical ->
dispatch -> experts -> combine), so expert parallelism, EPLB's load recorder and its expert map apply.

- `GptOssMoE`: `TopkSoftmaxRouter` + `BiasedClampedExperts` (biases, clamped SwiGLU), no shared expert.
- `InputScaledMoE` (Llama-4): the top-1 sigmoid weight multiplies the expert's INPUT, not its output, and
  the shared expert sees the unscaled input: out = expert(x * w) + shared(x). The layer routes first,
  then runs the `MoE` pipeline on x * w with the chosen ids and combine weights of 1 (exact for top-1,
  which every Llama-4 checkpoint uses; top-k > 1 is rejected).
Shape legend: T tokens, D hidden, K top-k.
"""

from __future__ import annotations

import torch
from moefleet.engine.layers.experts_variants import BiasedClampedExperts
from moefleet.engine.layers.moe import MoE, MoEStep
from moefleet.engine.layers.router import RoutingConfig
from moefleet.engine.layers.router_variants import TopkSigmoidRouter, TopkSoftmaxRouter
from torch import nn


class GptOssMoE(MoE):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        alpha: float,
        limit: float,
    ):
        super().__init__(hidden_size, intermediate_size, RoutingConfig(num_experts=num_experts, top_k=top_k))
        self.gate = TopkSoftmaxRouter(hidden_size, num_experts, top_k)  # type: ignore[assignment]
        # Same physical slots as the base layer built (EPLB: the logical expert of each local slot).
        local_experts = list(self.experts.local_experts)  # type: ignore[has-type]
        self.experts = BiasedClampedExperts(local_experts, hidden_size, intermediate_size, alpha, limit)


class _ChosenExperts(nn.Module):
    """The `gate` slot of an `InputScaledMoE`: it routes in `stage_route` (router first, then
    `MoE.route_chosen` with the chosen ids), so this gate holds no state and is never called."""

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("InputScaledMoE routes in stage_route: its gate is not called")


class InputScaledMoE(MoE):
    """Llama-4 MoE: `router` (HF `feed_forward.router`), routed experts, `shared_expert`."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, shared: nn.Module
    ):
        if top_k != 1:
            raise ValueError(
                f"num_experts_per_tok {top_k} is not supported for Llama-4 MoE layers (supported: 1, as in "
                "every released Llama-4 checkpoint): the expert input is scaled by its router weight"
            )
        super().__init__(hidden_size, intermediate_size, RoutingConfig(num_experts=num_experts, top_k=top_k))
        self.router = TopkSigmoidRouter(hidden_size, num_experts, top_k)
        self.gate = _ChosenExperts()  # type: ignore[assignment]
        self.shared_expert = shared

    def stage_route(self, hidden: torch.Tensor) -> MoEStep:
        """Route on x, then the `MoE` pipeline on x * w; the shared expert reads the unscaled x."""
        weights, ids = self.router(hidden)  # [T, 1]
        ones = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)  # combine weights of 1
        step = self.route_chosen(hidden * weights.to(hidden.dtype), ones, ids)
        step.hidden = hidden
        return step

    def shared_output(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.shared_expert(hidden)  # type: ignore[no-any-return]
