"""EPLB pieces of `moefleet bench`: synthetic routing skew and a rebalance between two timed phases.

`--routing-skew zipf:S` replaces each MoE layer's router output by draws from a Zipf(S) distribution over
the logical experts (expert popularity rank r has weight 1 / r^S; which expert is hot is a fixed random
permutation per layer, identical on every rank), top-k distinct experts per token, equal combine weights.
Random weights route almost uniformly; real traffic does not, and the skew is what EPLB has to fix.

`rebalance(model, ...)` runs on every rank together: the load the recorder collected during the "before"
steps is all-reduced, planned (every rank gets the same plan) and applied one layer at a time so the pause
per layer can be reported. Shape legend: T tokens, K top-k, E logical experts.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from moefleet.engine.eplb import planner
from moefleet.engine.eplb.expert_location import ExpertLocation, moe_layers
from moefleet.engine.eplb.rebalance import apply_layers
from moefleet.engine.eplb.recorder import ExpertLoadRecorder
from torch import nn


def parse_skew(value: str) -> float:
    """'zipf:S' -> S (> 0); '' -> 0 (no skew)."""
    if not value:
        return 0.0
    kind, _, exponent = value.partition(":")
    try:
        s = float(exponent)
    except ValueError:
        s = -1.0
    if kind != "zipf" or s <= 0:
        raise ValueError(f"--routing-skew {value!r}: expected zipf:S with S > 0 (e.g. zipf:1.2)")
    return s


def zipf_probs(num_experts: int, s: float, seed: int) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    return (weights[order] / weights.sum()).float()  # expert e gets the weight of popularity rank order[e]


class _SkewedRouter(nn.Module):
    probs: torch.Tensor  # [E]

    def __init__(self, probs: torch.Tensor, top_k: int, seed: int):
        super().__init__()
        self.register_buffer("probs", probs)
        self.top_k = top_k
        self.generator: torch.Generator | None = None
        self.seed = seed

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.generator is None:
            self.generator = torch.Generator(hidden.device).manual_seed(self.seed)
        num_tokens = hidden.shape[0]
        ids = torch.multinomial(
            self.probs.expand(num_tokens, -1), self.top_k, replacement=False, generator=self.generator
        )  # [T, K]
        weights = torch.full(ids.shape, 1.0 / self.top_k, dtype=torch.float32, device=hidden.device)
        return weights, ids


def apply_routing_skew(model: nn.Module, s: float, rank: int, seed: int = 0) -> int:
    """Replace every MoE layer's gate by a Zipf(s) sampler; returns the number of layers changed."""
    count = 0
    for i, (_, layer) in enumerate(moe_layers(model)):
        gate: Any = layer.gate
        probs = zipf_probs(gate.config.num_experts, s, seed + i).to(gate.weight.device)
        layer.gate = _SkewedRouter(probs, gate.config.top_k, seed=seed * 7919 + rank * 104729 + i)
        count += 1
    return count


def attach_recorder(model: nn.Module, window_steps: int) -> ExpertLoadRecorder:
    layers = [layer for _, layer in moe_layers(model)]
    first: Any = layers[0]
    recorder = ExpertLoadRecorder(
        len(layers), int(first.logical_replicas.shape[0]), window_steps, first.logical_replicas.device
    )
    recorder.attach(layers)
    return recorder


def measured_balancedness(loads: list[list[int]], location: ExpertLocation, world_size: int) -> float:
    values = [planner.balancedness(w, p, world_size) for w, p in zip(loads, location.phy2log, strict=True)]
    return sum(values) / len(values)


def rebalance(
    model: nn.Module,
    recorder: ExpertLoadRecorder,
    group: dist.ProcessGroup | None,
    num_redundant: int,
    num_nodes: int = 1,
    num_groups: int = 1,
) -> dict[str, Any]:
    """Plan from the recorded load and move the weights, one layer per pause; every rank calls it."""
    rank = 0 if group is None else dist.get_rank(group)
    world_size = 1 if group is None else dist.get_world_size(group)
    layers = [layer for _, layer in moe_layers(model)]
    loads = recorder.read(group)
    num_logical = len(loads[0])
    old = ExpertLocation.initial(len(layers), num_logical, num_redundant, world_size)
    plan = planner.plan(loads, old.num_physical, world_size, num_nodes, num_groups, previous=old.phy2log)
    new = ExpertLocation(num_logical, world_size, plan.phy2log)
    pauses, moved = [], 0
    for i in range(len(layers)):
        if group is not None:
            dist.barrier(group)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        moved += apply_layers(layers, old, new, [i], rank, group)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        pauses.append(time.perf_counter() - start)
    recorder.reset()
    return {
        "balancedness_before": measured_balancedness(loads, old, world_size),
        "predicted_balancedness": plan.mean_predicted_balancedness,
        "moved_experts": moved,
        "pause_per_layer_ms": [p * 1e3 for p in pauses],
        "location": new,
    }
