"""Where this serving process sits in a multi-process launch (nodes x processes per node): plain data.

Validated at construction with messages naming the flag, so `moefleet serve` can reject a bad launch before
anything heavy starts. The DP/EP front end reads it to form the process group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ParallelLaunch:
    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes ({self.nnodes}) must be >= 1")
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node ({self.nproc_per_node}) must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank ({self.node_rank}) must be in [0, nnodes ({self.nnodes}))")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"--master-port ({self.master_port}) must be in 1..65535")
        if not self.master_addr:
            raise ValueError("--master-addr must not be empty")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def global_rank(self, local_rank: int) -> int:
        """Rank of local process `local_rank` of this node in the whole group."""
        if not 0 <= local_rank < self.nproc_per_node:
            raise ValueError(
                f"local_rank ({local_rank}) must be in [0, nproc_per_node ({self.nproc_per_node}))"
            )
        return self.node_rank * self.nproc_per_node + local_rank
