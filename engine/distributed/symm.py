"""Expert-parallel dispatch/combine over torch symmetric memory (NVSHMEM), with every count on the device.

No host synchronisation per MoE layer: the row counts never leave the GPU, every shape is fixed by the
capacity, so a decode step with this dispatcher can be captured in a CUDA graph.

Per MoE layer on every rank of the EP group (also with T = 0 tokens):
  dispatch_start   sort the T*K hits by physical expert (= by destination rank, then local expert); copy
                   the rows into the symmetric send buffer with the local expert id packed after the hidden
                   columns (one extra 16-byte column group); rows per destination rank -> `in_splits`;
                   `torch.ops.symm_mem.all_to_all_vdev` moves them (splits exchanged on the device).
  dispatch_finish  received rows arrive rank-major; a stable sort of their packed ids gives the expert-major
                   order; the Triton row gather (`kernels.row_copy`) copies only the received rows into the
                   [W*C, D] expert-major tensor the fused MoE kernel reads with `counts` [L] (device).
  combine_start    scatter the expert outputs back to the received (rank-major) positions of the symmetric
                   return buffer; a second all_to_all_vdev with the received splits sends them home.
  combine_finish   rows come back in this rank's send order: weight by top-k and sum per token (no atomics).

Capacity: C = max_tokens_per_rank * top_k rows leave a rank at most, W * C arrive at most (every rank sends
every hit here), so overflow is impossible by sizing; a batch larger than `max_tokens_per_rank` (a shape,
known on the host) is refused with a readable error. Buffers are allocated once per process on the first
dispatch (a collective all ranks reach together) and shared by every layer: one workspace per micro-batch
in flight (two-batch overlap holds two), leased from dispatch_start to combine_finish.

Every tensor carries an explicit device index (NVSHMEM's team manager rejects plain "cuda").
Shape legend: T tokens, K top-k, D hidden, W ranks, E physical experts, L = E / W local, C capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from moefleet.engine.distributed.groups import check_experts_divisible
from moefleet.engine.distributed.workspace_pool import WorkspacePool
from moefleet.engine.layers.token_dispatch import DispatchedTokens

ID_BYTES = 16  # the packed expert id takes one 16-byte group of columns (keeps rows 16-byte aligned)
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

SYMM_HINT = (
    "the 'symm' MoE backend needs CUDA GPUs and a torch build with NVSHMEM symmetric memory "
    "(torch.distributed._symmetric_memory.is_nvshmem_available(); pip install nvidia-nvshmem-cu13 for CUDA 13); "
    "or use --moe-backend a2a"
)


def symm_available() -> bool:
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return False
    return torch.cuda.is_available() and bool(symm_mem.is_nvshmem_available())


# ---- pure parts (device tensors in, device tensors out; also run on CPU in the tests) --------------------


# torch's all_to_all_vdev (2.11) splits each peer's bytes evenly over `blocks per peer` = num_blocks // W,
# num_blocks = min(round_up(ceil(input bytes / 64 KiB), W), 64 within a node, 16 across nodes), and asserts
# the split is exact. Input buffers of >= 64 chunks fix num_blocks at the cap, and row strides that are a
# multiple of every possible blocks-per-peer (and of 64 bytes) make every split exact.
A2A_CHUNK_BYTES = 16 * 512 * 8
A2A_MAX_BLOCKS = (64, 16)


@dataclass(frozen=True)
class Capacity:
    send_rows: int  # C = max_tokens_per_rank * top_k: rows that may leave a rank
    recv_rows: int  # W * C: rows that may arrive
    width: int  # dispatch row width: D + packed id columns, padded (see A2A_CHUNK_BYTES)
    back_width: int  # combine row width: D, padded
    send_alloc_rows: int  # rows allocated for the dispatch input (>= send_rows, >= 64 chunks)
    back_alloc_rows: int  # rows allocated for the combine input (>= recv_rows, >= 64 chunks)


def id_columns(dtype: torch.dtype) -> int:
    """Columns of `dtype` holding the packed local expert id (16 bytes)."""
    return max(ID_BYTES // dtype.itemsize, 1)


def a2a_row_bytes(raw_bytes: int, world_size: int) -> int:
    """Pure: `raw_bytes` rounded up to a multiple of 64 and of every blocks-per-peer all_to_all_vdev may use."""
    align = 64
    for max_blocks in A2A_MAX_BLOCKS:
        per_peer = max(max_blocks // world_size, 1)
        align = math.lcm(align, per_peer)
    return -(-raw_bytes // align) * align


def a2a_alloc_rows(rows: int, row_bytes: int) -> int:
    """Pure: at least `rows`, and enough for 64 all_to_all_vdev chunks (so its block count is the cap)."""
    return max(rows, -(-max(A2A_MAX_BLOCKS) * A2A_CHUNK_BYTES // row_bytes))


def capacity(
    max_tokens_per_rank: int, top_k: int, world_size: int, hidden_size: int, dtype: torch.dtype
) -> Capacity:
    """Pure: buffer rows so no routing can overflow (every hit of every rank may come here)."""
    if max_tokens_per_rank <= 0 or top_k <= 0 or world_size <= 0 or hidden_size <= 0:
        raise ValueError(
            f"symm capacity needs positive sizes: max_tokens_per_rank={max_tokens_per_rank}, top_k={top_k}, "
            f"world_size={world_size}, hidden_size={hidden_size}"
        )
    size = dtype.itemsize
    send = max_tokens_per_rank * top_k
    width = a2a_row_bytes((hidden_size + id_columns(dtype)) * size, world_size) // size
    back_width = a2a_row_bytes(hidden_size * size, world_size) // size
    return Capacity(
        send,
        world_size * send,
        width,
        back_width,
        a2a_alloc_rows(send, width * size),
        a2a_alloc_rows(world_size * send, back_width * size),
    )


def workspace_bytes(cap: Capacity, dtype: torch.dtype) -> int:
    """Pure: symmetric bytes of one workspace (send + receive for dispatch, then for combine)."""
    rows = (cap.send_alloc_rows + cap.recv_rows) * cap.width + (
        cap.back_alloc_rows + cap.send_rows
    ) * cap.back_width
    return rows * dtype.itemsize


@dataclass
class SendPlan:
    order: torch.Tensor  # [T*K] flattened hit index, sorted by physical expert (padding hits last)
    local_ids: torch.Tensor  # [T*K] local expert id on the destination rank, per sorted hit
    splits: torch.Tensor  # [W] int64 rows to each rank
    num_valid: torch.Tensor  # [1] int64 rows sent in all (hits with an expert id >= 0)


def plan_send(topk_ids: torch.Tensor, num_experts: int, world_size: int) -> SendPlan:
    """Pure, sync-free: group this rank's hits by destination rank and local expert (ids < 0 are padding)."""
    num_local = num_experts // world_size
    flat = topk_ids.reshape(-1).to(torch.int64)
    keys = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    sorted_keys, order = torch.sort(keys, stable=True)
    dest = sorted_keys // num_local  # padding -> bucket W
    per_rank = torch.zeros(world_size + 1, dtype=torch.int64, device=flat.device)
    per_rank.scatter_add_(0, dest, torch.ones_like(dest))
    splits = per_rank[:world_size]
    return SendPlan(order, sorted_keys % num_local, splits, splits.sum().reshape(1))


@dataclass
class ExpertMajor:
    order: torch.Tensor  # [R] received row feeding each expert-major row (valid for the first num_valid)
    counts: torch.Tensor  # [L] int32 rows per local expert
    num_valid: torch.Tensor  # [1] int64 rows received


def plan_expert_major(recv_ids: torch.Tensor, recv_splits: torch.Tensor, num_local: int) -> ExpertMajor:
    """Pure, sync-free: received rows (rank-major, the first sum(recv_splits) valid, packed local ids
    `recv_ids` [R]) -> expert-major order (sources in rank order within an expert) and counts per expert."""
    num_valid = recv_splits.sum().reshape(1)
    rows = torch.arange(recv_ids.shape[0], device=recv_ids.device)
    ids = recv_ids.to(torch.int64).clamp(0, num_local - 1)  # rows past num_valid hold stale bytes
    keys = torch.where(rows < num_valid, ids, torch.full_like(ids, num_local))
    order = torch.sort(keys, stable=True).indices
    counts = torch.zeros(num_local + 1, dtype=torch.int32, device=recv_ids.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
    return ExpertMajor(order, counts[:num_local], num_valid)


def combine_hits_kernel(
    returned: torch.Tensor,
    order: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    hidden: int,
) -> torch.Tensor:
    """`combine_hits` as one Triton gather-reduce (kernels/moe_combine.py; what CUDA runs): each token reads
    its K returned rows once, padding hits skipped, float32 sums, no per-hit copies."""
    from moefleet.engine.kernels.moe_combine import combine_rows, hit_positions

    hits = topk_ids.numel()
    order = order[:hits]
    pos = hit_positions(order, hits, valid=topk_ids.reshape(-1)[order] >= 0)
    return combine_rows(returned[:, :hidden], pos, topk_weights)


def combine_hits(
    returned: torch.Tensor,
    order: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    hidden_size: int | None = None,
) -> torch.Tensor:
    """Pure: `returned` [>= T*K, D] expert outputs in sorted-hit order -> [T, D] = sum_k w * out (padding hits
    and stale rows contribute exactly zero; a fixed-order sum, no atomics)."""
    num_tokens, top_k = topk_ids.shape
    hits = num_tokens * top_k
    hidden = returned.shape[1] if hidden_size is None else hidden_size
    if returned.is_cuda:
        return combine_hits_kernel(returned, order, topk_ids, topk_weights, hidden)
    position = torch.empty_like(order)
    position[order] = torch.arange(hits, device=order.device)
    per_hit = returned[:hits, :hidden][position].view(num_tokens, top_k, hidden)
    weighted = per_hit * topk_weights.to(returned.dtype).unsqueeze(-1)
    valid = (topk_ids >= 0).unsqueeze(-1)
    return (
        torch.where(valid, weighted, torch.zeros_like(weighted))
        .sum(1, dtype=torch.float32)
        .to(returned.dtype)
    )


# ---- buffers (one set per micro-batch in flight, shared by all layers) ------------------------------------


def _use_nvshmem() -> None:
    """all_to_all_vdev needs the NVSHMEM allocator (set before the first symmetric allocation)."""
    import torch.distributed._symmetric_memory as symm_mem

    try:
        symm_mem.set_backend("NVSHMEM")
    except Exception:  # noqa: BLE001 - already chosen by an earlier allocation; the op reports a wrong one
        pass


@dataclass(frozen=True)
class WorkspaceShape:
    """What sizes one workspace: its pool key, and everything `SymmWorkspace` allocates from."""

    cap: Capacity
    hidden_size: int
    dtype: torch.dtype
    device: torch.device


class SymmWorkspace:
    """Symmetric buffers of one dispatch + combine: allocated and rendezvoused once (a collective)."""

    def __init__(self, group: dist.ProcessGroup, shape: WorkspaceShape):
        import torch.distributed._symmetric_memory as symm_mem

        cap, hidden_size, dtype, device = shape.cap, shape.hidden_size, shape.dtype, shape.device
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"symm buffers need an explicit CUDA device index, got {device}")
        world = dist.get_world_size(group)
        self.group_name = group.group_name
        _use_nvshmem()
        self.cap, self.hidden_size, self.dtype, self.device = cap, hidden_size, dtype, device
        self.in_use = False

        def alloc(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            try:
                t = symm_mem.empty(*shape, dtype=dt, device=device)
                symm_mem.rendezvous(t, self.group_name)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"symm dispatcher: allocating {workspace_bytes(cap, dtype) / 2**20:.0f} MiB of symmetric memory "
                    f"per micro-batch failed ({exc}); it grows with --max-num-batched-tokens x top-k x ranks x "
                    "hidden: lower --max-num-batched-tokens, raise NVSHMEM_SYMMETRIC_SIZE, or use --moe-backend a2a"
                ) from exc
            return t

        with torch.cuda.device(device):  # NVSHMEM initialises on the current device: make it this rank's
            self._allocate(cap, hidden_size, world, alloc)

    def _allocate(self, cap: Capacity, hidden_size: int, world: int, alloc: Any) -> None:
        dtype = self.dtype
        self.send = alloc(cap.send_alloc_rows, cap.width)  # dispatch: rows out, id packed at column D
        self.recv = alloc(cap.recv_rows, cap.width)  # dispatch: rows in (rank-major)
        self.back_send = alloc(
            cap.back_alloc_rows, cap.back_width
        )  # combine: expert outputs, received layout
        self.back_recv = alloc(cap.send_rows, cap.back_width)  # combine: this rank's hits, send order
        self.splits = alloc(world, dt=torch.int64)
        self.recv_splits_offsets = alloc(2, world, dt=torch.int64)
        self.back_splits = alloc(world, dt=torch.int64)
        self.back_splits_offsets = alloc(2, world, dt=torch.int64)
        int_dtype = _INT_OF_SIZE[dtype.itemsize]
        self.send_ids = self.send.view(int_dtype)[:, hidden_size]
        self.recv_ids = self.recv.view(int_dtype)[:, hidden_size]
        self.send.zero_()
        self.recv.zero_()
        self.bytes = workspace_bytes(cap, dtype)


# Construction-time registry (one pool per group and process, like the symmetric memory it holds): read when a
# dispatcher is built; the forward path only touches the `WorkspacePool` its dispatcher holds.
_POOLS: dict[str, WorkspacePool[WorkspaceShape, SymmWorkspace]] = {}


def workspace_pool(group: dist.ProcessGroup) -> WorkspacePool[WorkspaceShape, SymmWorkspace]:
    if group.group_name not in _POOLS:
        _POOLS[group.group_name] = WorkspacePool(lambda shape: SymmWorkspace(group, shape), "symm")
    return _POOLS[group.group_name]


# ---- the dispatcher ---------------------------------------------------------------------------------------


@dataclass
class _SymmHandle:
    ws: SymmWorkspace
    plan: SendPlan
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    major: ExpertMajor | None = None


class SymmDispatcher:
    """TokenDispatcher over torch symmetric memory: device-side splits, fixed capacity, no host sync."""

    TBO_OVERLAP = "comm_stream"  # two-batch overlap: all_to_all_vdev kernels launched on the comm stream
    SYNC_FREE_DECODE = True  # device-side splits, fixed capacity: decode steps can be captured in CUDA graphs

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_experts: int,
        hidden_size: int,
        max_tokens_per_rank: int,
        *,
        reserve: tuple[int, torch.dtype, torch.device, int] | None = None,
    ):
        """`reserve` = (top_k, dtype, device, micro-batches): allocate the workspaces now (a collective), so
        they exist before the KV cache takes the free memory; else on the first dispatch."""
        self.group = group
        self.world_size = dist.get_world_size(group)
        check_experts_divisible(num_experts, self.world_size)
        if hidden_size <= 0:
            raise ValueError(f"symm dispatcher needs the model's hidden size, got {hidden_size}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.num_local_experts = num_experts // self.world_size
        self.max_tokens_per_rank = max_tokens_per_rank
        self.pool = workspace_pool(group)
        if reserve is not None:
            top_k, dtype, device, micro_batches = reserve
            shape = WorkspaceShape(self._capacity(top_k, dtype), hidden_size, dtype, device)
            self.pool.reserve(shape, micro_batches)

    def _capacity(self, top_k: int, dtype: torch.dtype) -> Capacity:
        if self.num_local_experts >= 2 ** (8 * dtype.itemsize - 1):
            raise ValueError(f"{self.num_local_experts} local experts do not fit a packed {dtype} id")
        return capacity(self.max_tokens_per_rank, top_k, self.world_size, self.hidden_size, dtype)

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        num_tokens, top_k = topk_ids.shape
        if num_tokens > self.max_tokens_per_rank:
            raise ValueError(
                f"symm dispatcher: {num_tokens} tokens on this rank but buffers hold {self.max_tokens_per_rank} "
                "(max tokens per rank of the step agreement): raise --max-num-batched-tokens at start-up"
            )
        if hidden.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden has {hidden.shape[1]} columns, the dispatcher was built for {self.hidden_size}"
            )
        device = hidden.device
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        shape = WorkspaceShape(self._capacity(top_k, hidden.dtype), self.hidden_size, hidden.dtype, device)
        ws = self.pool.lease(shape)
        from moefleet.engine.kernels.row_copy import copy_rows

        plan = plan_send(topk_ids, self.num_experts, self.world_size)
        hits = num_tokens * top_k
        if hits:
            copy_rows(hidden, ws.send, plan.order // top_k, plan.num_valid)
            ws.send_ids[:hits].copy_(plan.local_ids)
        ws.splits.copy_(plan.splits)
        torch.ops.symm_mem.all_to_all_vdev(ws.send, ws.recv, ws.splits, ws.recv_splits_offsets, ws.group_name)
        return _SymmHandle(ws, plan, topk_ids, topk_weights)

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        h: _SymmHandle = pending
        ws = h.ws
        from moefleet.engine.kernels.row_copy import copy_rows

        h.major = plan_expert_major(ws.recv_ids, ws.recv_splits_offsets[0], self.num_local_experts)
        grouped = torch.empty(ws.cap.recv_rows, self.hidden_size, dtype=ws.dtype, device=ws.device)
        copy_rows(ws.recv, grouped, h.major.order, h.major.num_valid)
        return DispatchedTokens(grouped, None, h, counts=h.major.counts)

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        h: _SymmHandle = dispatched.handle
        ws = h.ws
        assert h.major is not None
        from moefleet.engine.kernels.row_copy import copy_rows

        copy_rows(expert_output.contiguous(), ws.back_send, h.major.order, h.major.num_valid, scatter=True)
        ws.back_splits.copy_(ws.recv_splits_offsets[0])
        torch.ops.symm_mem.all_to_all_vdev(
            ws.back_send, ws.back_recv, ws.back_splits, ws.back_splits_offsets, ws.group_name
        )
        return h

    def combine_finish(self, pending: Any) -> torch.Tensor:
        h: _SymmHandle = pending
        out = combine_hits(h.ws.back_recv, h.plan.order, h.topk_ids, h.topk_weights, self.hidden_size)
        h.ws.in_use = False
        return out
