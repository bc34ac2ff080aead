"""Expert-parallel dispatch/combine by direct writes into peers' GPU memory over NVLink (one node).

The low-latency design (DeepEP's, here on torch symmetric memory and two Triton kernels): every rank of the EP
group holds the same buffers; a sender writes each (token, expert) row straight into the destination rank's
receive rows, in the masked expert layout the fused-MoE kernel reads as it is, and the expert outputs go back
the same way. No counts exchange, no sort, no host sync: a decode step with this dispatcher is capturable in
a CUDA graph. Per MoE layer on every rank (also with T = 0 tokens):

  dispatch_start   `dispatch_rows`: per hit, an atomic add on the destination's counter of that local expert
                   gives the slot; the row and its source (rank, hit) are written there.
  dispatch_finish  barrier (every rank's writes are visible); counts = the counters (then zeroed for the next
                   layer: the combine barrier orders that before any peer's next dispatch); the experts get
                   recv_x [L, C, D] with counts [L] on the device.
  combine_start    `return_rows`: each valid received row goes back to its source's combine buffer at the
                   hit's position (the experts' outputs, unweighted).
  combine_finish   barrier; out[t] = sum_k w[t, k] * back[t * K + k] (kernels.moe_combine, float32 sums,
                   padding hits left out).

Capacity: C = W x tokens_per_rank rows per local expert (a token reaches an expert at most once: routers never
repeat an expert within a token), so no routing overflows; a hit that would (a router that repeats) is
dropped and counted on the device (`dropped`), never written out of bounds. Memory per workspace: L x C x D
receive rows + tokens x K x D combine rows (+ small); decode steps use `decode_tokens` (<= max tokens per rank,
default 256 like DeepEP's low-latency mode); prefill steps (the group-agreed `is_prefill`) use the same
buffers when `max_tokens_per_rank` fits `PREFILL_BUDGET_BYTES`, else the `prefill` dispatcher (a2a).

`Fabric` is the seam to the memory: `SymmFabric` (torch symmetric memory, peers' pointers over NVLink,
torch's signal-pad barrier) in production; `SimFabric` holds every rank's buffers in one process (ranks
driven one after another; a barrier is a no-op) so the kernels' cross-rank logic runs in CPU tests.
Shape legend: T tokens, K top-k, D hidden, W ranks, E physical experts, L = E / W local experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from moefleet.engine.distributed.groups import check_experts_divisible
from moefleet.engine.distributed.workspace_pool import WorkspacePool
from moefleet.engine.layers.token_dispatch import DispatchedTokens, TokenDispatcher

DECODE_TOKENS = 256  # default decode tokens per rank the buffers hold (DeepEP low-latency's usual bound)
PREFILL_BUDGET_BYTES = 8 << 30  # prefill steps share the buffers when one workspace at full size fits this
FP8_GROUP = 128  # FP8 rows: one float32 scale per row per 128 columns (DeepSeek-V3's block size)

NVLINK_HINT = (
    "the 'nvlink' MoE backend needs CUDA GPUs of one node with peer access (NVLink) and torch symmetric memory "
    "(torch.distributed._symmetric_memory); or use --moe-backend symm / a2a"
)


def nvlink_available() -> bool:
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---- pure sizing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    tokens: int  # tokens per rank one dispatch may carry
    rows_per_expert: int  # C = W x tokens
    hits: int  # tokens x K: combine rows per rank


def capacity(tokens_per_rank: int, top_k: int, world_size: int) -> Capacity:
    if tokens_per_rank <= 0 or top_k <= 0 or world_size <= 0:
        raise ValueError(
            f"nvlink capacity needs positive sizes: tokens_per_rank={tokens_per_rank}, top_k={top_k}, "
            f"world_size={world_size}"
        )
    return Capacity(tokens_per_rank, world_size * tokens_per_rank, tokens_per_rank * top_k)


def workspace_bytes(
    cap: Capacity, num_local: int, hidden: int, dtype: torch.dtype, fp8_rows: bool = False
) -> int:
    """Pure: symmetric bytes of one workspace (receive rows in FP8 + scales with `fp8_rows`)."""
    rows = num_local * cap.rows_per_expert
    row_bytes = hidden + 4 * -(-hidden // FP8_GROUP) if fp8_rows else hidden * dtype.itemsize
    return rows * row_bytes + cap.hits * hidden * dtype.itemsize + rows * 4 + num_local * 4


def shares_prefill(
    max_tokens_per_rank: int,
    top_k: int,
    world_size: int,
    num_local: int,
    hidden: int,
    dtype: torch.dtype,
    fp8_rows: bool = False,
) -> bool:
    """Pure: whether prefill steps fit the buffers (one workspace at max_tokens_per_rank <= the budget)."""
    cap = capacity(max_tokens_per_rank, top_k, world_size)
    return workspace_bytes(cap, num_local, hidden, dtype, fp8_rows) <= PREFILL_BUDGET_BYTES


def return_row_groups(tokens: int, top_k: int, num_local: int, rows_per_expert: int) -> int:
    """Pure: programs per local expert in `return_rows`: the balanced rows per expert (T*K/L), >= 1."""
    return max(1, min(rows_per_expert, -(-tokens * top_k // max(num_local, 1))))


# ---- the memory seam ----------------------------------------------------------------------------------------


class Fabric(Protocol):
    rank: int
    world_size: int

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(this rank's zeroed tensor, pointer table [W] int64 on its device, barrier handle). Collective."""
        ...

    def barrier(self, handle: Any) -> None:
        """Every rank's writes before it are visible to every rank after it."""
        ...


class SymmFabric:
    """torch symmetric memory over NVLink: peers' pointers from the rendezvous, torch's barrier kernel."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"nvlink buffers need an explicit CUDA device index, got {device}")
        self.group, self.device = group, device
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Any]:
        import torch.distributed._symmetric_memory as symm_mem

        try:  # torch's CUDA backend: peers' memory mapped over NVLink, no fixed-size heap (NVSHMEM has one)
            symm_mem.set_backend("CUDA")
        except Exception:  # noqa: BLE001 - chosen already in this process (e.g. NVSHMEM by symm): use that one
            pass
        with torch.cuda.device(self.device):
            try:
                tensor = symm_mem.empty(*shape, dtype=dtype, device=self.device)
                handle = symm_mem.rendezvous(tensor, self.group)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"nvlink dispatcher: allocating {math.prod(shape) * dtype.itemsize / 2**20:.0f} MiB of symmetric "
                    f"memory failed ({exc}): lower --max-num-seqs / --max-num-batched-tokens (or, on torch's NVSHMEM "
                    "backend, raise NVSHMEM_SYMMETRIC_SIZE), or use --moe-backend symm / a2a"
                ) from exc
            tensor.zero_()
            handle.barrier(channel=0)  # zeroed everywhere before any peer writes into it
        table = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=self.device)
        return tensor, table, handle

    def barrier(self, handle: Any) -> None:
        handle.barrier(channel=0)


@dataclass
class SimGroup:
    """Every rank's buffers in one process (tests; one GPU standing for W): the k-th allocation of each rank
    returns its own tensor of the k-th set, all W tensors in one pointer table."""

    world_size: int
    device: torch.device
    sets: list[list[torch.Tensor]] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=dict)


class SimFabric:
    def __init__(self, sim: SimGroup, rank: int):
        self.sim, self.rank, self.world_size = sim, rank, sim.world_size

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Any]:
        index = self.sim.calls.get(self.rank, 0)
        self.sim.calls[self.rank] = index + 1
        if index == len(self.sim.sets):
            self.sim.sets.append(
                [torch.zeros(shape, dtype=dtype, device=self.sim.device) for _ in range(self.world_size)]
            )
        tensors = self.sim.sets[index]
        table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=self.sim.device)
        return tensors[self.rank], table, None

    def barrier(self, handle: Any) -> None:
        pass  # the ranks run one after another


# ---- workspaces ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkspaceShape:
    cap: Capacity
    num_local: int
    hidden: int
    dtype: torch.dtype  # the activations' (and the combine rows') dtype
    fp8_rows: bool = False  # dispatch FP8 rows + scales (FP8 experts) instead of `dtype` rows

    @property
    def row_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.fp8_rows else self.dtype

    @property
    def groups(self) -> int:
        return -(-self.hidden // FP8_GROUP)


class Workspace:
    """One dispatch + combine's buffers: receive rows [L, C, D], their sources [L, C], counters [L], combine
    rows [T*K, D], and a device counter of dropped hits."""

    def __init__(self, fabric: Fabric, shape: WorkspaceShape):
        cap, local, hidden = shape.cap, shape.num_local, shape.hidden
        self.shape = shape
        self.recv_x, self.recv_x_table, self.handle = fabric.alloc(
            (local, cap.rows_per_expert, hidden), shape.row_dtype
        )
        self.recv_scales: torch.Tensor | None = None
        self.recv_scale_table: torch.Tensor | None = None
        if shape.fp8_rows:
            self.recv_scales, self.recv_scale_table, _ = fabric.alloc(
                (local, cap.rows_per_expert, shape.groups), torch.float32
            )
        self.recv_src, self.recv_src_table, _ = fabric.alloc((local, cap.rows_per_expert), torch.int32)
        self.counters, self.counter_table, _ = fabric.alloc((local,), torch.int32)
        self.back, self.back_table, _ = fabric.alloc((cap.hits, hidden), shape.dtype)
        self.dropped = torch.zeros(1, dtype=torch.int32, device=self.recv_x.device)
        self.in_use = False


class NvlinkPool(WorkspacePool[WorkspaceShape, Workspace]):
    """A process's nvlink workspaces over one fabric, shared by every layer (workspace_pool.py)."""

    def __init__(self, fabric: Fabric):
        super().__init__(lambda shape: Workspace(fabric, shape), "nvlink")
        self.fabric = fabric

    def dropped(self) -> int:
        """Hits dropped so far (a router that repeated an expert within a token): a host read, for checks."""
        return sum(int(ws.dropped.item()) for ws in self.workspaces())


_POOLS: dict[tuple[str, int], NvlinkPool] = {}


def workspace_pool(group: dist.ProcessGroup, device: torch.device) -> NvlinkPool:
    """The process's pool for this group and device (built once; the fabric allocates lazily)."""
    key = (group.group_name, device.index if device.index is not None else -1)
    if key not in _POOLS:
        _POOLS[key] = NvlinkPool(SymmFabric(group, device))
    return _POOLS[key]


# ---- the dispatcher -----------------------------------------------------------------------------------------


@dataclass
class _Handle:
    ws: Workspace
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    counts: torch.Tensor | None = None


@dataclass
class _Prefill:
    """A pending call of the prefill dispatcher (its own handles travel inside the DispatchedTokens as they are)."""

    inner: Any


class NvlinkDispatcher:
    """TokenDispatcher writing rows into peers' memory (see the module doc). `prefill`: the dispatcher of
    prefill steps when they do not fit these buffers (None: they must fit)."""

    TBO_OVERLAP = "comm_stream"  # two-batch overlap: the copy kernels and barriers run on the comm stream
    SYNC_FREE_DECODE = True  # device-side slots and counts, fixed capacity: decode steps capture in graphs

    def __init__(
        self,
        pool: NvlinkPool,
        num_experts: int,
        hidden_size: int,
        max_tokens_per_rank: int,
        *,
        decode_tokens: int = DECODE_TOKENS,
        prefill: TokenDispatcher | None = None,
        reserve: tuple[int, torch.dtype, int] | None = None,
        fp8_rows: bool = False,
    ):
        """`reserve` = (top_k, dtype, micro-batches): allocate the decode workspaces now (a collective).
        `fp8_rows`: dispatch FP8 rows + per-128-column scales (half the bytes; for FP8 experts, whose masked
        kernel applies the scales in its GEMM); else rows in the activations' dtype."""
        self.fp8_rows = fp8_rows
        self.pool = pool
        self.rank, self.world_size = pool.fabric.rank, pool.fabric.world_size
        check_experts_divisible(num_experts, self.world_size)
        if hidden_size <= 0:
            raise ValueError(f"nvlink dispatcher needs the model's hidden size, got {hidden_size}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.num_local_experts = num_experts // self.world_size
        self.max_tokens_per_rank = max_tokens_per_rank
        self.decode_tokens = max(1, min(decode_tokens, max_tokens_per_rank))
        self.prefill = prefill
        if reserve is not None:  # decode workspaces, and prefill's when prefill steps use these buffers too
            top_k, dtype, micro_batches = reserve
            for is_prefill in (False, True):
                if not self.uses_prefill_dispatcher(is_prefill, top_k, dtype):
                    self.pool.reserve(self._shape(self._tokens(is_prefill), top_k, dtype), micro_batches)

    def _shape(self, tokens: int, top_k: int, dtype: torch.dtype) -> WorkspaceShape:
        return WorkspaceShape(
            capacity(tokens, top_k, self.world_size),
            self.num_local_experts,
            self.hidden_size,
            dtype,
            self.fp8_rows,
        )

    def _tokens(self, is_prefill: bool | None) -> int:
        return self.decode_tokens if is_prefill is False else self.max_tokens_per_rank

    def uses_prefill_dispatcher(self, is_prefill: bool | None, top_k: int, dtype: torch.dtype) -> bool:
        """Pure in the group-agreed inputs: prefill (or unknown-mode) steps whose full-size buffers exceed the
        budget go to `prefill` (every rank decides the same)."""
        if is_prefill is False or self.prefill is None:
            return False
        return not shares_prefill(
            self.max_tokens_per_rank,
            top_k,
            self.world_size,
            self.num_local_experts,
            self.hidden_size,
            dtype,
            self.fp8_rows,
        )

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        num_tokens, top_k = topk_ids.shape
        if self.uses_prefill_dispatcher(is_prefill, top_k, hidden.dtype):
            assert self.prefill is not None
            return _Prefill(
                self.prefill.dispatch_start(hidden, topk_ids, topk_weights, is_prefill=is_prefill)
            )
        tokens = self._tokens(is_prefill)
        if num_tokens > tokens:
            mode = "decode" if is_prefill is False else "prefill"
            raise ValueError(
                f"nvlink dispatcher: {num_tokens} tokens on this rank in a {mode} step, buffers hold {tokens}: "
                + (
                    "lower --max-num-seqs (decode tokens per rank)"
                    if is_prefill is False
                    else "raise --max-num-batched-tokens at start-up"
                )
            )
        if hidden.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden has {hidden.shape[1]} columns, the dispatcher was built for {self.hidden_size}"
            )
        from moefleet.engine.kernels.nvlink_ep import dispatch_rows

        ws = self.pool.lease(self._shape(tokens, top_k, hidden.dtype))
        rows, scales = hidden, None
        if self.fp8_rows:
            from moefleet.engine.kernels.fp8_quant import quantize_per_token_group

            rows, scales = quantize_per_token_group(hidden.contiguous(), FP8_GROUP)  # once per token
        dispatch_rows(
            rows,
            topk_ids,
            ws.recv_x_table,
            ws.recv_src_table,
            ws.counter_table,
            ws.dropped,
            hit_base=self.rank * ws.shape.cap.hits,
            num_local_experts=self.num_local_experts,
            capacity=ws.shape.cap.rows_per_expert,
            scales=scales,
            recv_scale_table=ws.recv_scale_table,
        )
        return _Handle(ws, topk_ids, topk_weights)

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        if isinstance(pending, _Prefill):
            assert self.prefill is not None
            return self.prefill.dispatch_finish(pending.inner)
        h: _Handle = pending
        ws = h.ws
        self.pool.fabric.barrier(ws.handle)
        from moefleet.engine.kernels.nvlink_ep import take_counts

        # zeroed too: the combine barrier orders that before any peer's next dispatch
        h.counts = take_counts(ws.counters)
        return DispatchedTokens(
            ws.recv_x,
            None,
            h,
            counts=h.counts,
            scales=ws.recv_scales,  # FP8 rows: the masked kernel applies them in its GEMM
            expected_rows=h.topk_ids.numel() or None,  # this rank's hits: the balanced share
        )

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        h = dispatched.handle
        if not isinstance(h, _Handle):  # the prefill dispatcher's rows
            assert self.prefill is not None
            return _Prefill(self.prefill.combine_start(expert_output, dispatched))
        from moefleet.engine.kernels.nvlink_ep import return_rows

        ws = h.ws
        local, cap = self.num_local_experts, ws.shape.cap.rows_per_expert
        tokens, top_k = h.topk_ids.shape
        if expert_output.dtype != ws.back.dtype:  # e.g. FP8 rows in, bf16 out: the combine rows' dtype
            expert_output = expert_output.to(ws.back.dtype)
        return_rows(
            expert_output.view(local, cap, self.hidden_size),
            h.counts,
            ws.recv_src,
            ws.back_table,
            hits_per_rank=ws.shape.cap.hits,
            row_groups=return_row_groups(tokens, top_k, local, cap),
        )
        return h

    def combine_finish(self, pending: Any) -> torch.Tensor:
        if isinstance(pending, _Prefill):
            assert self.prefill is not None
            return self.prefill.combine_finish(pending.inner)
        from moefleet.engine.kernels.moe_combine import combine_hit_rows

        h: _Handle = pending
        ws = h.ws
        self.pool.fabric.barrier(ws.handle)
        out = combine_hit_rows(ws.back[: h.topk_ids.numel()], h.topk_ids, h.topk_weights)
        ws.in_use = False
        return out
