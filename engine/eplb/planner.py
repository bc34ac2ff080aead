"""EPLB planner: where each physical expert slot should hold which logical expert. Pure Python, no torch.

Input per MoE layer: the logical experts' recent loads (tokens routed to each), the number of physical
slots P (a multiple of the GPU count; P - E slots are redundant copies), GPUs, GPUs per node and expert
groups. Output per layer: `phy2log` [P], slot p lives on GPU p // (P / GPUs).

Two policies (DeepSeek's EPLB, written from its description):
- hierarchical, when the expert groups divide evenly over the nodes: pack whole groups onto nodes (equal
  group count per node, lightest node first), replicate within each node (each spare slot copies the expert
  with the highest load per replica), then pack that node's replicas onto its GPUs;
- global otherwise: replicate over all slots at once, then pack onto all GPUs.
Packing = sort items by load, heaviest first, each into the lightest pack that still has room, so every
GPU gets exactly P / GPUs slots. Load prediction is out of scope: the recorder's window is the prediction.

Balancedness of a layer = (mean GPU load + eps) / (max GPU load + eps), where a GPU's load is the sum over
its slots of load[expert] / replicas[expert] (a token of a replicated expert is spread evenly). 1.0 is
perfect; all-zero load counts as perfect.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

EPS = 1e-6


@dataclass(frozen=True, slots=True)
class Plan:
    """A placement for every MoE layer and its predicted balancedness."""

    phy2log: list[list[int]]  # [L][P] logical expert held by each physical slot
    policy: str  # "hierarchical" | "global"
    predicted_balancedness: list[float]  # [L]

    @property
    def mean_predicted_balancedness(self) -> float:
        return sum(self.predicted_balancedness) / max(len(self.predicted_balancedness), 1)


def check_slots(num_logical: int, num_physical: int, num_gpus: int) -> None:
    if num_gpus < 1:
        raise ValueError(f"number of GPUs ({num_gpus}) must be >= 1")
    if num_physical < num_logical:
        raise ValueError(f"physical slots ({num_physical}) must be >= logical experts ({num_logical})")
    if num_physical % num_gpus:
        raise ValueError(
            f"physical expert slots ({num_physical}) are not divisible by the number of GPUs ({num_gpus})"
        )


def replicate(loads: Sequence[float], num_slots: int) -> list[int]:
    """Replica count per expert: one each, then every spare slot to the highest load per replica (ties:
    lowest expert id)."""
    counts = [1] * len(loads)
    heap = [(-float(w), e) for e, w in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(num_slots - len(loads)):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-float(loads[e]) / counts[e], e))
    return counts


def balanced_packing(weights: Sequence[float], num_packs: int) -> list[list[int]]:
    """Items (indices into `weights`) per pack: heaviest first into the lightest pack with room; every pack
    gets len(weights) / num_packs items. Ties go to the lower item / pack index (deterministic)."""
    if len(weights) % num_packs:
        raise ValueError(f"{len(weights)} items do not split evenly into {num_packs} packs")
    capacity = len(weights) // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    totals = [0.0] * num_packs
    for item in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        pack = min((p for p in range(num_packs) if len(packs[p]) < capacity), key=lambda p: (totals[p], p))
        packs[pack].append(item)
        totals[pack] += float(weights[item])
    return packs


def _replicate_and_pack(
    loads: Sequence[float], experts: Sequence[int], num_slots: int, gpus: int
) -> list[list[int]]:
    """Logical experts held by each of `gpus` GPUs (num_slots / gpus each), for the given experts."""
    local_loads = [float(loads[e]) for e in experts]
    counts = replicate(local_loads, num_slots)
    replicas = [i for i, c in enumerate(counts) for _ in range(c)]  # index into `experts`, one per slot
    per_replica = [local_loads[i] / counts[i] for i in replicas]
    packs = balanced_packing(per_replica, gpus)
    return [sorted(experts[replicas[r]] for r in pack) for pack in packs]


def plan_layer(
    loads: Sequence[float], num_physical: int, num_gpus: int, num_nodes: int = 1, num_groups: int = 1
) -> tuple[list[int], str]:
    """phy2log [P] for one layer, and the policy used."""
    num_logical = len(loads)
    check_slots(num_logical, num_physical, num_gpus)
    hierarchical = (
        num_nodes > 1
        and num_groups % num_nodes == 0
        and num_logical % num_groups == 0
        and num_gpus % num_nodes == 0
        and num_physical % num_nodes == 0
        and num_physical // num_nodes >= num_logical // num_nodes
    )
    if not hierarchical:
        gpus = _replicate_and_pack(loads, range(num_logical), num_physical, num_gpus)
        return [e for gpu in gpus for e in gpu], "global"
    group_size = num_logical // num_groups
    group_loads = [
        sum(float(w) for w in loads[g * group_size : (g + 1) * group_size]) for g in range(num_groups)
    ]
    nodes = balanced_packing(group_loads, num_nodes)
    phy2log: list[int] = []
    for node_groups in nodes:
        experts = [g * group_size + i for g in sorted(node_groups) for i in range(group_size)]
        gpus = _replicate_and_pack(loads, experts, num_physical // num_nodes, num_gpus // num_nodes)
        phy2log += [e for gpu in gpus for e in gpu]
    return phy2log, "hierarchical"


def gpu_loads(loads: Sequence[float], phy2log: Sequence[int], num_gpus: int) -> list[float]:
    """Load of each GPU if every expert's tokens are spread evenly over its replicas."""
    replicas = [0] * len(loads)
    for e in phy2log:
        replicas[e] += 1
    per_gpu = len(phy2log) // num_gpus
    totals = [0.0] * num_gpus
    for p, e in enumerate(phy2log):
        totals[p // per_gpu] += float(loads[e]) / replicas[e]
    return totals


def balancedness(loads: Sequence[float], phy2log: Sequence[int], num_gpus: int) -> float:
    """(mean + eps) / (max + eps) of the GPU loads, in (0, 1]."""
    totals = gpu_loads(loads, phy2log, num_gpus)
    return (sum(totals) / len(totals) + EPS) / (max(totals) + EPS)


def align_to_previous(new: Sequence[int], old: Sequence[int], num_gpus: int) -> list[int]:
    """Reorder `new` within each GPU so slots that already hold the right expert keep it (no copy needed).
    The multiset of experts per GPU is unchanged, so balance is too."""
    per_gpu = len(new) // num_gpus
    out: list[int] = []
    for g in range(num_gpus):
        want = list(new[g * per_gpu : (g + 1) * per_gpu])
        had = old[g * per_gpu : (g + 1) * per_gpu]
        slots: list[int | None] = [None] * per_gpu
        for i, e in enumerate(had):
            if e in want:
                want.remove(e)
                slots[i] = e
        rest = iter(want)
        out += [e if e is not None else next(rest) for e in slots]
    return out


def plan(
    loads: Sequence[Sequence[float]],
    num_physical: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    previous: Sequence[Sequence[int]] | None = None,
) -> Plan:
    """A placement for every layer (`loads` [L][E]); with `previous` [L][P], slots keep their expert where
    the new placement allows it, so a rebalance moves as few weights as possible."""
    layers: list[list[int]] = []
    policy = "global"
    for i, layer_loads in enumerate(loads):
        phy2log, policy = plan_layer(layer_loads, num_physical, num_gpus, num_nodes, num_groups)
        if previous is not None:
            phy2log = align_to_previous(phy2log, previous[i], num_gpus)
        layers.append(phy2log)
    predicted = [balancedness(w, p, num_gpus) for w, p in zip(loads, layers, strict=True)]
    return Plan(layers, policy, predicted)
