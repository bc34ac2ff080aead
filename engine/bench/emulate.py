"""`moefleet bench --emulate-ep N`: one GPU doing the per-GPU work of an N-way expert-parallel deployment.

The model keeps its real width (attention, dense layers, shared experts, expert matrices) but each MoE layer
holds only the experts one GPU of the deployment holds, (E + redundant) / N, and receives the routed-row
volume one GPU receives there. With uniform routing, a GPU of an N-way group receives on average
tokens_per_gpu x top_k rows (every GPU sends that many, spread evenly), so `EmulatedEPDispatcher` keeps all
T x K (token, expert) hits of this GPU's own tokens and sends every one to a local expert: physical slot
p -> p mod (local experts). Same rows, same experts, no communication: the measured step is the deployment's
compute per GPU, and communication is added separately (`--comm-us-per-layer`, docs/benchmarks.md) or stands in
the step as GPU waits of wall-clock time per dispatch and combine (`--emulate-comm-us`, kernels/gpu_wait.py).

Example: DeepSeek-V3 decode at EP72 with 32 redundant experts: (256 + 32) / 72 = 4 experts per GPU; 256
tokens x top-8 = 2,048 rows per GPU per MoE layer, 512 per expert.

On W > 1 real GPUs (`--nproc-per-node W`, W <= N): rank r builds its layers as rank r of the N-way deployment
(L = P / N slots, r * L .. r * L + L - 1), the real dispatchers of the W-rank group are installed over the
group's W x L slots, and `EmulatedRoutingDispatcher` rewrites the router's physical ids (in [0, N x L)) to a
balanced pattern over [0, W x L) (`balanced_slot_ids`) before every dispatch. Each real GPU then sends T x K
rows, receives T x K rows on average and computes them with L experts, as a deployment GPU does, and the
dispatch/combine between the W GPUs is real: its remote share is (W - 1) / W instead of (N - 1) / N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from moefleet.engine.eplb.expert_location import check_expert_slots
from moefleet.engine.kernels.gpu_wait import gpu_wait, wait_ns
from moefleet.engine.layers.token_dispatch import DispatchedTokens, ForwardingDispatcher, LocalDispatcher


@dataclass(frozen=True, slots=True)
class EmulatedShape:
    """Per-GPU MoE work of an `ep_size`-way deployment (pure arithmetic, validated)."""

    ep_size: int
    num_experts: int  # logical routed experts
    num_redundant_experts: int
    top_k: int
    tokens_per_gpu: int
    world_size: int = 1  # real GPUs the emulation runs on (--nproc-per-node), each one deployment GPU

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"--emulate-ep ({self.ep_size}) must be >= 1")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be in [1, num_experts ({self.num_experts})]")
        if self.tokens_per_gpu < 0:
            raise ValueError(f"tokens_per_gpu ({self.tokens_per_gpu}) must be >= 0")
        check_expert_slots(self.num_experts, self.num_redundant_experts, self.ep_size)
        if self.world_size < 1:
            raise ValueError(f"--nproc-per-node ({self.world_size}) must be >= 1")
        if self.world_size > self.ep_size:
            raise ValueError(
                f"--nproc-per-node ({self.world_size}) must be <= --emulate-ep ({self.ep_size}): each real GPU "
                f"stands for one of the {self.ep_size} GPUs of the deployment; lower --nproc-per-node or raise "
                "--emulate-ep"
            )
        if self.world_size > 1 and self.top_k > self.group_slots:
            raise ValueError(
                f"top-{self.top_k} routing needs {self.top_k} distinct expert slots per token, but "
                f"--nproc-per-node {self.world_size} x {self.experts_per_gpu} experts per GPU (--emulate-ep "
                f"{self.ep_size}) = {self.group_slots} slots: use --nproc-per-node >= "
                f"{-(-self.top_k // self.experts_per_gpu)} or a smaller --emulate-ep (more experts per GPU)"
            )

    @property
    def physical_experts(self) -> int:
        return self.num_experts + self.num_redundant_experts

    @property
    def experts_per_gpu(self) -> int:
        return self.physical_experts // self.ep_size

    @property
    def rows_per_gpu(self) -> int:
        """Routed (token, expert) rows one GPU's experts compute per MoE layer (expected, uniform routing)."""
        return self.tokens_per_gpu * self.top_k

    @property
    def rows_per_expert(self) -> float:
        return self.rows_per_gpu / self.experts_per_gpu

    @property
    def group_slots(self) -> int:
        """Expert slots across the real GPUs: the ids `balanced_slot_ids` routes to."""
        return self.world_size * self.experts_per_gpu

    @property
    def remote_share(self) -> float:
        """Share of each GPU's routed rows that leave it here (uniform over the W real GPUs)."""
        return (self.world_size - 1) / self.world_size

    @property
    def deployment_remote_share(self) -> float:
        """The same share in the N-way deployment."""
        return (self.ep_size - 1) / self.ep_size


def emulated_shape(options: Any, world_size: int = 1) -> EmulatedShape:
    """The validated shape of `options` (a `BenchOptions` with `emulate_ep` > 0) on `world_size` real GPUs.

    Refuses --routing-skew on W > 1 GPUs: the emulated routing there is balanced by construction."""
    from moefleet.engine.bench.presets import num_experts, preset_config

    if world_size > 1 and options.routing_skew:
        raise ValueError(
            f"--routing-skew has no effect with --emulate-ep on {world_size} GPUs (the emulated routing is "
            "balanced by construction): drop --routing-skew, or --nproc-per-node for the one-GPU emulation"
        )
    config = preset_config(options.preset, options.num_layers, options.dense_layers)
    return EmulatedShape(
        options.emulate_ep,
        num_experts(config),
        options.num_redundant_experts,
        int(config["num_experts_per_tok"]),
        options.tokens_per_step,
        world_size,
    )


def local_expert_ids(topk_ids: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """Physical slot ids [T, K] -> local expert ids (slot mod local experts); padding (-1) stays -1.

    On device, no host sync (CUDA-graph capturable)."""
    return torch.where(topk_ids >= 0, topk_ids % num_local_experts, topk_ids)


class EmulatedEPDispatcher(ForwardingDispatcher):
    """A `TokenDispatcher` that routes every hit of this GPU's tokens to its local experts (see module doc).

    `comm_us` > 0 (`--emulate-comm-us`): dispatch_start and combine_start each also hold the current stream for
    `comm_us` x T / `full_tokens` microseconds, T the tokens moved (`wait_ns`): the deployment's transfer time,
    proportional to the rows moved (a two-batch-overlap micro-batch of half the tokens waits half as long).
    `wait(ns)` waits on the GPU: `gpu_wait` by default (one warp spinning on the GPU's nanosecond timer: the
    other SMs stay free, and the time is wall-clock whatever the SM clock), or what `choose_wait` picked. Two-batch
    overlap runs these waits on its comm stream (`TBO_OVERLAP` "comm_stream") beside the other micro-batch's
    compute, as it runs a real dispatcher's transfers. Everything else is its `LocalDispatcher`'s."""

    def __init__(
        self,
        num_local_experts: int,
        comm_us: float = 0.0,
        full_tokens: int = 1,
        wait: Callable[[int], None] | None = None,
    ):
        if num_local_experts < 1:
            raise ValueError(f"num_local_experts ({num_local_experts}) must be >= 1")
        if comm_us < 0 or full_tokens < 1:
            raise ValueError(f"comm_us ({comm_us}) must be >= 0 and full_tokens ({full_tokens}) >= 1")
        super().__init__(LocalDispatcher(num_local_experts))
        self.comm_us, self.full_tokens = comm_us, full_tokens
        self.wait = wait if wait is not None else gpu_wait
        self.TBO_OVERLAP = "comm_stream" if comm_us else "none"
        self.SYNC_FREE_DECODE = True

    def _transfer(self, tokens: int) -> None:
        ns = wait_ns(self.comm_us, tokens, self.full_tokens)
        if ns:
            self.wait(ns)

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        pending = super().dispatch_start(
            hidden, local_expert_ids(topk_ids, self.num_local_experts), topk_weights, is_prefill=is_prefill
        )
        self._transfer(hidden.shape[0])
        return pending

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        pending = super().combine_start(expert_output, dispatched)
        self._transfer(dispatched.handle.num_tokens)
        return pending


def balanced_slot_ids(topk_ids: torch.Tensor, num_slots: int, offset: int = 0) -> torch.Tensor:
    """Physical ids [T, K] -> a balanced pattern over [0, num_slots): hit k of token t goes to slot
    (t * K + k + offset) mod num_slots; padding ids (< 0) stay as they are (-1).

    A pure function of the shape (and `offset`), not of the router's choices: consecutive hits take consecutive
    slots, so (a) the K ids of one token are distinct whenever K <= num_slots (a real router never repeats an
    expert within a token; DeepEP low-latency overflows otherwise), and (b) over a batch every slot receives
    floor or ceil of T * K / num_slots hits. Same device and dtype; on device, no host sync (CUDA-graph
    capturable)."""
    tokens, top_k = topk_ids.shape
    hits = torch.arange(tokens * top_k, device=topk_ids.device, dtype=topk_ids.dtype).view(tokens, top_k)
    return torch.where(topk_ids >= 0, (hits + offset) % num_slots, topk_ids)


class EmulatedRoutingDispatcher(ForwardingDispatcher):
    """Wraps a real dispatcher of a W-rank group: rewrites the router's ids to `balanced_slot_ids` over the
    group's W x L slots before every dispatch; everything else (combine, `TBO_OVERLAP`, `SYNC_FREE_DECODE`,
    `graph_replay_state`, `pool`, ...) is the real dispatcher's."""

    def __init__(self, inner: Any, num_slots: int, offset: int = 0):
        if num_slots < 1:
            raise ValueError(f"num_slots ({num_slots}) must be >= 1")
        super().__init__(inner)
        self.num_slots = num_slots
        self.offset = offset

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        ids = balanced_slot_ids(topk_ids, self.num_slots, self.offset)
        return self.inner.dispatch_start(hidden, ids, topk_weights, is_prefill=is_prefill)


def emulated_routing(make: Callable[..., Any], rank: int, world_size: int) -> Callable[..., Any]:
    """A dispatcher factory for `apply_expert_parallel(make=...)`: `make`'s real dispatcher over the group's
    `num_experts` (= W x L) slots, wrapped in `EmulatedRoutingDispatcher`. Rank r's pattern starts at its own
    first slot (offset r x L), so the +-1 remainders of the ranks land on different slots."""

    def build(backend: str, group: Any, num_experts: int, **options: Any) -> EmulatedRoutingDispatcher:
        offset = rank * (num_experts // world_size)
        return EmulatedRoutingDispatcher(make(backend, group, num_experts, **options), num_experts, offset)

    return build


def install_emulated_dispatchers(
    model: torch.nn.Module,
    num_micro_batches: int = 1,
    comm_us: float = 0.0,
    full_tokens: int = 1,
    wait: Callable[[int], None] | None = None,
) -> int:
    """Give every MoE layer (built under the emulated topology) emulating dispatchers (with `comm_us` of
    emulated transfer per dispatch and per combine of `full_tokens` tokens, waited by `wait`); returns the
    count."""
    from moefleet.engine.distributed.ep import moe_layers

    count = 0
    for _, layer in moe_layers(model):
        local = len(layer.experts.local_experts)  # type: ignore[union-attr,arg-type]
        dispatchers = [
            EmulatedEPDispatcher(local, comm_us, full_tokens, wait) for _ in range(num_micro_batches)
        ]
        setattr(layer, "dispatchers", dispatchers)  # noqa: B010
        setattr(layer, "dispatcher", dispatchers[0])  # noqa: B010
        count += 1
    return count
