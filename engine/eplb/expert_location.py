"""Expert placement as data: which logical expert each physical slot holds, per MoE layer.

P physical slots = E logical experts + N redundant ones; rank r of an expert-parallel group of W ranks owns
slots [r * P/W, (r+1) * P/W) (so dispatchers keep sending physical ids to contiguous blocks). A slot may
hold any logical expert, and a logical expert may have several replicas.

    phy2log   [L, P]      logical expert of each slot
    log2phy   [L, E, R]   its replicas' slots, -1 padded; R = P - E + 1 (the most any placement can need,
                          so the MoE layer's buffers keep one shape across rebalances)
    replicas  [L, E]      number of replicas

The router still returns logical ids; `choose_replicas` picks a physical slot per (token, expert) on device:
a replica on the token's own rank if there is one (no network hop), else one on its node (spread by token
index), else one spread by token index over all replicas.
Shape legend: T tokens, K top-k, L MoE layers, E logical experts, P physical slots, R max replicas.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ENV_REDUNDANT_EXPERTS = "MOEFLEET_EPLB_REDUNDANT_EXPERTS"


def num_routed_experts(hf_config: dict[str, Any]) -> int | None:
    value = hf_config.get("num_experts", hf_config.get("n_routed_experts"))
    return None if value is None else int(value)


def check_expert_slots(num_experts: int, num_redundant: int, world_size: int) -> int:
    """Slots per rank for E logical + N redundant experts over W ranks; a readable error when uneven."""
    if num_redundant < 0:
        raise ValueError(f"--num-redundant-experts ({num_redundant}) must be >= 0")
    physical = num_experts + num_redundant
    if physical % world_size:
        fits = next(
            n for n in range(num_redundant, num_redundant + world_size) if (num_experts + n) % world_size == 0
        )
        what = f"num_experts ({num_experts})"
        if num_redundant:
            what += f" + redundant experts ({num_redundant}) = {physical} physical expert slots"
        raise ValueError(
            f"{what} is not divisible by expert-parallel size ({world_size}): use --num-redundant-experts "
            f"{fits} (EPLB spare slots) or pick nnodes * nproc_per_node that divides {physical}"
        )
    return physical // world_size


def check_model_expert_slots(hf_config: dict[str, Any], world_size: int, num_redundant: int = 0) -> None:
    """`check_expert_slots` for a model's config.json (nothing to check without routed experts)."""
    num_experts = num_routed_experts(hf_config)
    if num_experts is not None:
        check_expert_slots(num_experts, num_redundant, world_size)
    elif num_redundant:
        raise ValueError("--num-redundant-experts needs a model with routed experts")


def initial_phy2log(num_experts: int, num_redundant: int) -> list[int]:
    """Start-up placement: slot p holds expert p mod E (identity without redundant experts)."""
    return [p % num_experts for p in range(num_experts + num_redundant)]


@dataclass
class ExpertLocation:
    """Placement of every MoE layer of one model (host data; `install` copies it into the layers)."""

    num_logical: int
    world_size: int
    phy2log: list[list[int]]  # [L][P]

    def __post_init__(self) -> None:
        for layer, row in enumerate(self.phy2log):
            check_expert_slots(self.num_logical, len(row) - self.num_logical, self.world_size)
            missing = set(range(self.num_logical)) - set(row)
            if missing or any(not 0 <= e < self.num_logical for e in row):
                raise ValueError(
                    f"layer {layer}: every logical expert needs >= 1 slot (missing {sorted(missing)})"
                )

    @classmethod
    def initial(
        cls, num_layers: int, num_logical: int, num_redundant: int, world_size: int
    ) -> ExpertLocation:
        return cls(
            num_logical, world_size, [initial_phy2log(num_logical, num_redundant) for _ in range(num_layers)]
        )

    @property
    def num_layers(self) -> int:
        return len(self.phy2log)

    @property
    def num_physical(self) -> int:
        return len(self.phy2log[0]) if self.phy2log else self.num_logical

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.world_size

    @property
    def max_replicas(self) -> int:
        return self.num_physical - self.num_logical + 1

    def local_slots(self, layer: int, rank: int) -> list[int]:
        """Logical expert of each of `rank`'s slots in `layer`."""
        s = self.slots_per_rank
        return self.phy2log[layer][rank * s : (rank + 1) * s]

    def replicas(self, layer: int) -> list[list[int]]:
        """[E] -> physical slots holding the expert, ascending."""
        out: list[list[int]] = [[] for _ in range(self.num_logical)]
        for p, e in enumerate(self.phy2log[layer]):
            out[e].append(p)
        return out

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log2phy [E, R] -1 padded, replica counts [E]) of one layer, int64 on the CPU."""
        log2phy = torch.full((self.num_logical, self.max_replicas), -1, dtype=torch.int64)
        counts = torch.zeros(self.num_logical, dtype=torch.int64)
        for e, slots in enumerate(self.replicas(layer)):
            log2phy[e, : len(slots)] = torch.tensor(slots, dtype=torch.int64)
            counts[e] = len(slots)
        return log2phy, counts

    def summary(self) -> dict[str, Any]:
        replicated = [sum(1 for r in self.replicas(i) if len(r) > 1) for i in range(self.num_layers)]
        return {
            "num_logical_experts": self.num_logical,
            "num_physical_experts": self.num_physical,
            "num_redundant_experts": self.num_physical - self.num_logical,
            "slots_per_rank": self.slots_per_rank,
            "ranks": self.world_size,
            "replicated_experts_per_layer": replicated,
        }


def choose_replicas(
    logical_ids: torch.Tensor,
    log2phy: torch.Tensor,
    replicas: torch.Tensor,
    rank: int,
    slots_per_rank: int,
    ranks_per_node: int = 0,
) -> torch.Tensor:
    """logical_ids [T, K] -> physical slots [T, K], on device without a host sync.

    A replica on this rank wins (the first one); else one on this node (ranks_per_node consecutive ranks;
    0 = one node), token t taking the node's replica (t mod count); else replica (t mod replica count).
    """
    if log2phy.shape[1] == 1:  # no redundant slots: one replica each
        return log2phy[:, 0][logical_ids]
    candidates = log2phy[logical_ids]  # [T, K, R]
    valid = candidates >= 0
    owner = torch.div(candidates, slots_per_rank, rounding_mode="floor")  # rank of each replica
    on_rank = valid & (owner == rank)
    token = torch.arange(logical_ids.shape[0], device=logical_ids.device).unsqueeze(1)  # [T, 1]
    choice = token % replicas[logical_ids]  # [T, K] spread over all replicas
    if ranks_per_node:
        on_node = valid & (torch.div(owner, ranks_per_node, rounding_mode="floor") == rank // ranks_per_node)
        node_count = on_node.sum(dim=-1)  # [T, K]
        wanted = token % node_count.clamp(min=1)  # which of the node's replicas
        # Position of the (wanted+1)-th replica on this node: first index where the running count passes it.
        nth = (on_node & (on_node.cumsum(dim=-1) == (wanted + 1).unsqueeze(-1))).to(torch.int8).argmax(dim=-1)
        choice = torch.where(node_count > 0, nth, choice)
    local_choice = on_rank.to(torch.int8).argmax(dim=-1)  # first local replica (0 when none)
    choice = torch.where(on_rank.any(dim=-1), local_choice, choice)
    return candidates.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def moe_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the MoE layers that take a placement (have `set_placement`), in model order."""
    for name, module in model.named_modules():
        if hasattr(module, "set_placement") and hasattr(module, "experts"):
            yield name, module


def layer_index(name: str) -> int:
    """Decoder layer number in a module name like 'model.layers.3.mlp' (-1 if none)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def install_maps(
    layers: Sequence[nn.Module], location: ExpertLocation, only: Sequence[int] | None = None
) -> None:
    """Copy each layer's maps (in place, so captured graphs stay valid) and its local slot list."""
    for i in range(location.num_layers) if only is None else only:
        log2phy, counts = location.layer_tensors(i)
        layers[i].set_placement(log2phy, counts)  # type: ignore[operator]
