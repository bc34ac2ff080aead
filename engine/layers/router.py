"""MoE routing (gate + top-k): returns LOGICAL expert ids and their combine weights.

Two schemes:
- softmax (Qwen3-MoE): softmax over all experts, top-k, optionally renormalised (`norm_topk_prob`).
- sigmoid (DeepSeek-V3 / Kimi-K2, "noaux_tc"): sigmoid scores; selection uses scores +
  e_score_correction_bias, restricted to the `topk_group` best of `n_group` expert groups (a group's score
  is the sum of its two best biased scores); weights are the unbiased scores of the chosen experts,
  optionally renormalised, times `routed_scaling_factor`.
Shape legend: T tokens, E experts, K top-k, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moefleet.engine.layers.linear import set_weight_loader
from torch import nn


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func {self.scoring!r} is not supported (supported: softmax, sigmoid)")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) must be in [1, num_experts ({self.num_experts})]"
            )
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts ({self.num_experts}) is not divisible by n_group ({self.n_group})"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group ({self.n_group})]")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError(
                "grouped top-k needs at least 2 experts per group (n_routed_experts / n_group >= 2)"
            )
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) exceeds the experts in topk_group ({self.topk_group}) groups"
            )


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, K] float32, ids [T, K])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_topk(
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 selection. scores [T, E] (sigmoid, float32) -> (weights [T, K], ids [T, K])."""
    num_tokens, num_experts = scores.shape
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        group_ids = torch.topk(group_scores, topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
        expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


class Router(nn.Module):
    """Gate: weight [E, D] (HF `mlp.gate.weight`), plus `e_score_correction_bias` [E] for sigmoid routing.

    Sigmoid routing (DeepSeek) keeps the gate in float32 like the reference, whatever the model dtype. With
    bf16 activations on CUDA and a gate whose values are all bf16 numbers (checkpoints store it in bf16), the
    logits come from one bf16 GEMM with float32 accumulation and output (`torch.mm(..., out_dtype=float32)`):
    each product of two bf16 numbers is exact in float32, so this is the reference's float32 GEMM up to the
    summation order, at bf16 tensor-core speed (the float32 GEMM took 1.3 ms per MoE layer at 16k tokens on
    an H200, 4% of a prefill layer).
    """

    def __init__(self, hidden_size: int, config: RoutingConfig):
        super().__init__()
        self.config = config
        gate_dtype = torch.float32 if config.scoring == "sigmoid" else None
        self.weight = set_weight_loader(
            nn.Parameter(torch.empty(config.num_experts, hidden_size, dtype=gate_dtype), requires_grad=False)
        )
        self.e_score_correction_bias = (
            set_weight_loader(
                nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32), requires_grad=False)
            )
            if config.correction_bias
            else None
        )
        # sigmoid selection through engine/kernels/grouped_topk.py on CUDA when its shapes allow (fixed per layer)
        from moefleet.engine.kernels import grouped_topk as fused

        self._fused_selection = (
            fused.fused_grouped_topk
            if fused.supports(config.num_experts, config.n_group, config.top_k)
            else None
        )
        # the gate as bf16 when exact (`prepare_gate`), and the (storage, version) of the weight it was made from
        self._bf16_weight: torch.Tensor | None = None
        self._bf16_source: tuple[int, int] | None = None

    def prepare_gate(self) -> None:
        """Decide once the weights are in place (`prepare_gates`; a host sync, never in a forward): keep the gate
        as bf16 if every value is a bf16 number. Tied to the weight's storage and version: a later load or
        in-place update turns the bf16 GEMM off until this runs again."""
        weight = self.weight.detach()
        bf16 = weight.to(torch.bfloat16)
        self._bf16_weight = bf16 if torch.equal(bf16.float(), weight.float()) else None
        self._bf16_source = (weight.data_ptr(), weight._version)

    def bf16_gate(self) -> torch.Tensor | None:
        """The prepared bf16 gate if it still matches the weight (no sync: safe in a forward and a capture)."""
        weight = self.weight
        return self._bf16_weight if self._bf16_source == (weight.data_ptr(), weight._version) else None

    def logits_float32(self, hidden: torch.Tensor) -> torch.Tensor:
        """Sigmoid routing's float32 logits [T, E] (see the class doc for the bf16 GEMM)."""
        if hidden.is_cuda and hidden.dtype == torch.bfloat16:
            gate = self.bf16_gate()
            if gate is not None:
                return torch.mm(hidden.reshape(-1, hidden.shape[-1]), gate.t(), out_dtype=torch.float32)
        return F.linear(hidden.float(), self.weight.float())

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, D] -> (weights [T, K] float32, logical ids [T, K] int64)."""
        c = self.config
        if c.scoring == "softmax":
            return softmax_topk(F.linear(hidden, self.weight), c.top_k, c.norm_topk_prob)
        logits = self.logits_float32(hidden)
        selection = (c.top_k, c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        if logits.is_cuda and self._fused_selection is not None:
            # one Triton program per token instead of ~10 torch kernels (engine/kernels/grouped_topk.py)
            return self._fused_selection(logits, self.e_score_correction_bias, *selection)
        return grouped_topk(logits.sigmoid(), self.e_score_correction_bias, *selection)


def prepare_gates(model: nn.Module) -> None:
    """`Router.prepare_gate` for every sigmoid router of `model`: call once its weights are loaded."""
    for module in model.modules():
        if isinstance(module, Router) and module.config.scoring == "sigmoid":
            module.prepare_gate()
