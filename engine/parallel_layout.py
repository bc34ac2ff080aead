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

    def __post_init__(self) -> None:
        if self.ep_size < 1 or not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank ({self.ep_rank}) must be in [0, ep_size ({self.ep_size}))")

    def local_experts(self, num_experts: int) -> range:
        """Contiguous block of expert ids owned by this rank (physical = logical until EPLB)."""
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
