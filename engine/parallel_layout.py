"""Where this process sits in its expert-parallel group: plain data, no process groups.

Model code reads it to build only this rank's experts; `moefleet.engine.distributed` sets it before the
model is built. Defaults describe a single process holding every expert.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    ep_rank: int = 0
    ep_size: int = 1
    # EPLB: extra physical expert slots (copies of busy experts); slots per rank = (E + this) / ep_size.
    num_redundant_experts: int = 0
    # Ranks per node (consecutive ranks share a node); 0 = unknown / one node. Replica choice prefers the node.
    ranks_per_node: int = 0

    def __post_init__(self) -> None:
        if self.ep_size < 1 or not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank ({self.ep_rank}) must be in [0, ep_size ({self.ep_size}))")
        if self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts ({self.num_redundant_experts}) must be >= 0")

    def local_experts(self, num_experts: int) -> range:
        """Contiguous block of physical expert slots owned by this rank (without redundant experts, also the
        logical experts it holds at start; `moefleet.engine.eplb` maps slots to logical experts)."""
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts ({num_experts}) is not divisible by expert-parallel size ({self.ep_size})"
            )
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


_layout = ParallelLayout()


def current() -> ParallelLayout:
    return _layout


def set_layout(layout: ParallelLayout) -> None:
    global _layout
    _layout = layout
