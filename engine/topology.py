"""Where this process sits in a deployment: one frozen, validated object (torchtitan's ParallelDims shape).

Every layer reads the same `Topology`: `moefleet serve` builds it from its flags and the launch contract's
environment variables (`Topology.from_env`, the one parser of both), `distributed.groups.init_distributed`
forms the process groups it describes, the watchdog reads its ranks, and model construction reads
`current()` (set before the model is built) to allocate only this rank's expert slots. No torch here.

Launch contract (the operator injects these, one process per GPU; flags of `moefleet serve` win over them):
MOEFLEET_NNODES, MOEFLEET_NODE_RANK, MOEFLEET_NPROC_PER_NODE, MOEFLEET_LOCAL_RANK, MOEFLEET_MASTER_ADDR /
MASTER_ADDR, MOEFLEET_MASTER_PORT / MASTER_PORT. Global rank = node_rank * nproc_per_node + local_rank.

Shape: world = nnodes * nproc_per_node; attention is data parallel over every rank (dp = world, tp = 1) and
routed experts are split over every rank (ep = world), with `num_redundant_experts` extra physical slots
(EPLB). The sizes are fields so that a deployment shape reads as data; anything the engine cannot run yet is
refused with a message saying what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

ENV_NNODES = "MOEFLEET_NNODES"
ENV_NODE_RANK = "MOEFLEET_NODE_RANK"
ENV_NPROC_PER_NODE = "MOEFLEET_NPROC_PER_NODE"
ENV_LOCAL_RANK = "MOEFLEET_LOCAL_RANK"
ENV_MOEFLEET_MASTER_ADDR = "MOEFLEET_MASTER_ADDR"
ENV_MOEFLEET_MASTER_PORT = "MOEFLEET_MASTER_PORT"
ENV_MASTER_ADDR = "MASTER_ADDR"  # torchrun convention, read after MOEFLEET_MASTER_ADDR
ENV_MASTER_PORT = "MASTER_PORT"

# How a user sets each field: named in every validation error.
SOURCES: dict[str, str] = {
    "nnodes": f"--nnodes / {ENV_NNODES}",
    "node_rank": f"--node-rank / {ENV_NODE_RANK}",
    "nproc_per_node": f"--nproc-per-node / {ENV_NPROC_PER_NODE}",
    "local_rank": ENV_LOCAL_RANK,
    "master_addr": f"--master-addr / {ENV_MOEFLEET_MASTER_ADDR}",
    "master_port": f"--master-port / {ENV_MOEFLEET_MASTER_PORT}",
    "num_redundant_experts": "--num-redundant-experts / MOEFLEET_EPLB_REDUNDANT_EXPERTS",
}


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    """An integer environment variable; missing or empty is `default`, anything else must parse."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} ({raw!r}) must be an integer") from None


@dataclass(frozen=True, slots=True)
class Topology:
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    dp_size: int = -1  # -1: the world size (DP attention on every rank)
    ep_size: int = -1  # -1: the world size (routed experts split over every rank)
    tp_size: int = 1
    # EPLB: extra physical expert slots (copies of busy experts); slots per rank = (E + this) / ep_size.
    num_redundant_experts: int = 0

    def __post_init__(self) -> None:
        for name in ("nnodes", "nproc_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1 (set {SOURCES[name]})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank ({self.node_rank}) must be in [0, nnodes ({self.nnodes})) (set {SOURCES['node_rank']})"
            )
        if not 0 <= self.local_rank < self.nproc_per_node:
            raise ValueError(
                f"local_rank ({self.local_rank}) must be in [0, nproc_per_node ({self.nproc_per_node}))"
            )
        if not self.master_addr:
            raise ValueError(f"master_addr must not be empty (set {SOURCES['master_addr']})")
        if not 0 < self.master_port < 65536:
            raise ValueError(
                f"master_port ({self.master_port}) must be in 1..65535 (set {SOURCES['master_port']})"
            )
        if self.num_redundant_experts < 0:
            raise ValueError(
                f"num_redundant_experts ({self.num_redundant_experts}) must be >= 0 "
                f"(set {SOURCES['num_redundant_experts']})"
            )
        world = self.world_size
        for name in ("dp_size", "ep_size"):
            if getattr(self, name) == -1:
                object.__setattr__(self, name, world // self.tp_size if name == "dp_size" else world)
        if self.tp_size != 1:
            raise ValueError(
                f"tp_size ({self.tp_size}) must be 1: tensor-parallel attention is not built; moefleet runs "
                "data-parallel attention on every rank"
            )
        if self.dp_size * self.tp_size != world:
            raise ValueError(
                f"dp_size ({self.dp_size}) x tp_size ({self.tp_size}) must equal the world size "
                f"nnodes x nproc_per_node ({self.nnodes} x {self.nproc_per_node} = {world})"
            )
        if self.ep_size != world:
            raise ValueError(
                f"ep_size ({self.ep_size}) must equal the world size ({world}): routed experts are split over "
                "every rank (leave ep_size at -1)"
            )

    # ---- derived ---------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def rank(self) -> int:
        return self.node_rank * self.nproc_per_node + self.local_rank

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def ep_rank(self) -> int:
        return self.rank

    @property
    def ranks_per_node(self) -> int:
        """Consecutive ranks sharing a node (EPLB prefers a replica on the token's node)."""
        return self.nproc_per_node

    @property
    def is_front_end(self) -> bool:
        """Global rank 0 serves the group's HTTP API."""
        return self.rank == 0

    @property
    def multi_process(self) -> bool:
        return self.world_size > 1

    def global_rank(self, local_rank: int) -> int:
        """Rank of local process `local_rank` of this node in the whole group."""
        return self.with_local_rank(local_rank).rank

    def with_local_rank(self, local_rank: int) -> Topology:
        """The same launch seen from another local process of this node (validated)."""
        return dataclasses.replace(self, local_rank=local_rank)

    def local_experts(self, num_experts: int) -> range:
        """Contiguous block of physical expert slots this rank owns (`num_experts` physical slots in all)."""
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts ({num_experts}) is not divisible by expert-parallel size ({self.ep_size})"
            )
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def for_rank(
        cls, rank: int, world_size: int, ranks_per_node: int = 0, num_redundant_experts: int = 0
    ) -> Topology:
        """Rank `rank` of `world_size` (e.g. read from a process group); `ranks_per_node` 0 = one node."""
        per_node = ranks_per_node or world_size
        if world_size < 1 or per_node < 1 or world_size % per_node:
            raise ValueError(
                f"world_size ({world_size}) must be a positive multiple of ranks_per_node ({per_node})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        return cls(
            nnodes=world_size // per_node,
            nproc_per_node=per_node,
            node_rank=rank // per_node,
            local_rank=rank % per_node,
            num_redundant_experts=num_redundant_experts,
        )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        nnodes: int | None = None,
        node_rank: int | None = None,
        nproc_per_node: int | None = None,
        local_rank: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        num_redundant_experts: int = 0,
    ) -> Topology:
        """The launch contract: explicit values (flags) first, then environment variables, then one process.

        Raises ValueError naming the variable or the field and how to set it."""
        env = os.environ if env is None else env

        def pick(value: int | None, name: str, default: int) -> int:
            return value if value is not None else env_int(env, name, default)

        return cls(
            nnodes=pick(nnodes, ENV_NNODES, 1),
            node_rank=pick(node_rank, ENV_NODE_RANK, 0),
            nproc_per_node=pick(nproc_per_node, ENV_NPROC_PER_NODE, 1),
            local_rank=pick(local_rank, ENV_LOCAL_RANK, 0),
            # MOEFLEET_MASTER_* is what the operator injects; MASTER_* is the torchrun convention.
            master_addr=master_addr
            or env.get(ENV_MOEFLEET_MASTER_ADDR)
            or env.get(ENV_MASTER_ADDR)
            or "127.0.0.1",
            master_port=pick(master_port, ENV_MOEFLEET_MASTER_PORT, env_int(env, ENV_MASTER_PORT, 29500)),
            num_redundant_experts=num_redundant_experts,
        )


# The construction-time hand-off to model code: set before a model is built, read by MoE layers.
_current = Topology()


def current() -> Topology:
    return _current


def set_current(topology: Topology) -> None:
    global _current
    _current = topology


@contextlib.contextmanager
def use(topology: Topology) -> Iterator[Topology]:
    """Build models under `topology`, then restore the previous one (tests, benchmarks)."""
    previous = current()
    set_current(topology)
    try:
        yield topology
    finally:
        set_current(previous)
