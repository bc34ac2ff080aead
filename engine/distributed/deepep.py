"""DeepEP-backed dispatcher (https://github.com/deepseek-ai/DeepEP, V1 `deep_ep.Buffer` API, commit 29d31c0).

Needs NVIDIA GPUs and a source build of DeepEP (README: "Installing DeepEP"); nothing here runs in CI.
ONE `deep_ep.Buffer` per process (`get_buffer`), shared by every layer and micro-batch, sized at the first
dispatcher for both modes from the hidden size, the experts and the max tokens per rank. The mode follows the
step: `dispatch_start(..., is_prefill=)` receives the micro-batch's `ForwardBatch.is_prefill` (the group-agreed
mode, so every rank picks the same kernels; two micro-batches alive at once each pass their own; nothing is
read from a module global):

- normal kernels (prefill steps, or any step whose mode is unknown): `get_dispatch_layout` + `dispatch` deliver
  each token once per destination rank with local expert ids (-1 = elsewhere) and weights; hits are grouped by
  local expert on the device (`permute_by_expert_on_device`: counts stay on the GPU), and on combine the
  weights are applied locally and hits summed per received token before `combine` sums across ranks. DeepEP's
  normal dispatch itself waits on the host for the receive counts (prefill only; not CUDA-graph safe).
- low-latency kernels (decode steps): `low_latency_dispatch` with FP8 (e4m3, per-128-column float32 scales,
  not UE8M0) and `return_recv_hook=True` (dispatch_start issues the sends, dispatch_finish calls the hook to
  receive) fills the masked layout [L, R * max_tokens, D] with per-expert counts on the device; the FP8 rows
  and their scales ([L, R * max_tokens, D / 128], column-major in the last two dims) are handed over as they
  are (`DispatchedTokens.scales`): the masked fused-MoE kernel (`Experts.forward` on a 3-D input) applies
  the scales inside its GEMM and never reads rows past the counts. `low_latency_combine` (bf16, applies the
  top-k weights) likewise returns a hook. No host synchronisation. The FP8 rows and scales are ordinary
  torch tensors that DeepEP allocates per call (csrc/deep_ep.cpp, `packed_recv_x`), not views of its buffer,
  so holding them until the experts run constrains no other call.

Limits (checked with readable errors): bf16 activations; low-latency hidden sizes are DeepEP's compiled set
(LL_HIDDEN_SIZES); low-latency tokens per rank <= `ll_max_tokens` (same value on every rank).
Shape legend: T tokens, K top-k, D hidden, R ranks, E physical experts, L = E / R local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from moefleet.engine.distributed.groups import check_experts_divisible
from moefleet.engine.layers.token_dispatch import (
    DispatchedTokens,
    permute_by_expert,
    permute_by_expert_on_device,
    unpermute_and_reduce,
)

INSTALL_HINT = (
    "the 'deepep' MoE backend needs the deep_ep module: build DeepEP from source (README, 'Installing DeepEP': "
    "https://github.com/deepseek-ai/DeepEP at commit 29d31c0, needs NVSHMEM and CUDA GPUs; the PyPI sdist does "
    "not build); or use --moe-backend a2a"
)
# Hidden sizes DeepEP's low-latency kernels are compiled for (csrc/kernels/launch.cuh SWITCH_HIDDEN).
LL_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
LL_MAX_TOKENS = (
    256  # default low-latency tokens per rank (decode batch); needs NVSHMEM QP depth >= 2 * (n + 1)
)
MODES = ("auto", "normal", "low_latency")


def deep_ep_available() -> bool:
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return False
    return True


def _import_buffer() -> Any:
    try:
        from deep_ep import Buffer
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    return Buffer


def expand_hits(
    recv_topk_idx: torch.Tensor, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pure (host counts, the CPU oracle of the device path): received tokens [M, K] with local expert ids
    (-1 = not here) -> (order [N] into the flattened [M*K] hits grouped by local expert, token_index [N] into
    the M received tokens, rows per local expert)."""
    order, token_index, counts = permute_by_expert(recv_topk_idx, num_local_experts)
    return order, token_index, counts.tolist()


def pick_mode(configured: str, step_is_prefill: bool | None, hidden_size: int) -> str:
    """Pure: the kernels of one step. auto = low-latency for decode steps when DeepEP has LL kernels for this
    hidden size, normal otherwise (prefill, unknown mode)."""
    if configured not in MODES:
        raise ValueError(f"DeepEP mode ({configured!r}) must be one of {MODES}")
    if configured == "low_latency" and hidden_size not in LL_HIDDEN_SIZES:
        raise ValueError(
            f"DeepEP low-latency kernels support hidden sizes {LL_HIDDEN_SIZES}, the model has {hidden_size}: "
            "use deepep mode normal (or --moe-backend symm/a2a)"
        )
    if configured != "auto":
        return configured
    if step_is_prefill is False and hidden_size in LL_HIDDEN_SIZES:
        return "low_latency"
    return "normal"


def check_ll_tokens(num_tokens: int, ll_max_tokens: int) -> None:
    if num_tokens > ll_max_tokens:
        raise ValueError(
            f"DeepEP low-latency dispatch got {num_tokens} tokens on this rank, the buffer holds {ll_max_tokens} "
            "per rank: lower --max-num-seqs (decode batch per rank) or raise the low-latency limit at start-up"
        )


# ---- one Buffer per process -------------------------------------------------------------------------------


@dataclass(eq=False)
class SharedBuffer:
    """The process's one deep_ep.Buffer for a group and the state of its memory, shared by every dispatcher
    (every layer, every micro-batch) of the group: each dispatcher holds a reference (no global lookup per
    step). `last_mode` is the buffer memory's state, not a step's: low-latency buffers must be cleaned after
    normal kernels used the shared memory."""

    buffer: Any
    hidden_size: int
    num_experts: int
    ll_max_tokens: int
    last_mode: str = "low_latency"

    def clean_for_low_latency(self) -> None:
        """Clean the low-latency buffer if normal kernels used the shared memory since the last clean."""
        if self.last_mode != "low_latency":
            self.buffer.clean_low_latency_buffer(self.ll_max_tokens, self.hidden_size, self.num_experts)
            self.last_mode = "low_latency"

    def before_graph_replay(self) -> None:
        """Run by the engine (once per process, not per layer) before it replays a captured decode step, which
        holds only the low-latency kernels and runs no Python: a prefill step's normal kernels since leave the
        buffer to clean first. Every rank runs the same sequence of step modes, so the ranks clean together."""
        self.clean_for_low_latency()


# Construction-time registry (DeepEP allows one Buffer per process): written when a dispatcher is built,
# keyed by group name; the forward path only touches the `SharedBuffer` its dispatcher holds.
_BUFFERS: dict[str, SharedBuffer] = {}


def get_buffer(
    group: dist.ProcessGroup, hidden_size: int, num_experts: int, ll_max_tokens: int
) -> SharedBuffer:
    """The process's one deep_ep.Buffer for `group` (created by the first caller: a collective)."""
    key = group.group_name
    if key in _BUFFERS:
        spec = _BUFFERS[key]
        if (spec.hidden_size, spec.num_experts, spec.ll_max_tokens) != (
            hidden_size,
            num_experts,
            ll_max_tokens,
        ):
            raise ValueError(
                f"one DeepEP buffer per process: built for hidden {spec.hidden_size}, {spec.num_experts} experts, "
                f"{spec.ll_max_tokens} low-latency tokens; a layer asks for hidden {hidden_size}, {num_experts} "
                f"experts, {ll_max_tokens} tokens"
            )
        return spec
    buffer_cls = _import_buffer()
    world_size = group.size()
    hidden_bytes = hidden_size * 2  # bf16
    nvl_bytes = rdma_bytes = 0
    for config in (buffer_cls.get_dispatch_config(world_size), buffer_cls.get_combine_config(world_size)):
        nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, world_size), nvl_bytes)
        if world_size > 8:
            rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, world_size), rdma_bytes)
    low_latency = hidden_size in LL_HIDDEN_SIZES
    if low_latency:
        rdma_bytes = max(
            buffer_cls.get_low_latency_rdma_size_hint(ll_max_tokens, hidden_size, world_size, num_experts),
            rdma_bytes,
        )
    buffer = buffer_cls(
        group,
        nvl_bytes,
        rdma_bytes,
        low_latency_mode=low_latency,
        num_qps_per_rank=max(num_experts // world_size, 1) if low_latency else 24,
    )
    shared = _BUFFERS[key] = SharedBuffer(buffer, hidden_size, num_experts, ll_max_tokens)
    return shared


# ---- the dispatcher ---------------------------------------------------------------------------------------


@dataclass
class _NormalHandle:
    deep_handle: Any
    order: torch.Tensor
    valid: torch.Tensor  # per sorted hit
    recv_topk_weights: torch.Tensor  # [M, K]
    num_received: int


@dataclass
class _LowLatencyHandle:
    deep_handle: Any
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    hook: Any = None


def reduce_received(expert_output: torch.Tensor, h: _NormalHandle) -> torch.Tensor:
    """Normal mode, before DeepEP's combine: weight each received hit's expert output [N, D] by its top-k
    weight and sum per received token -> [M, D] (float32 accumulation, padding hits contribute zeros)."""
    return unpermute_and_reduce(
        expert_output,
        h.order,
        h.recv_topk_weights,
        h.num_received,
        valid=h.valid,
        accumulate_dtype=torch.float32,
    )


class DeepEPDispatcher:
    """TokenDispatcher on DeepEP. `mode`: "auto" (per step: low-latency for decode), "normal" or "low_latency"."""

    # Two-batch overlap (tbo_streams.py): low-latency sends issue in *_start, the receive hook runs in *_finish,
    # so the launch order alone overlaps; no side stream (normal kernels: no GPU overlap yet).
    TBO_OVERLAP = "recv_hook"

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_experts: int,
        hidden_size: int,
        mode: str = "auto",
        max_tokens_per_rank: int = 128,
        ll_max_tokens: int | None = None,
        ll_fp8: bool = True,
    ):
        """`ll_fp8`: low-latency dispatch sends FP8 rows + scales (half the bytes; for FP8 experts, whose masked
        kernel applies the scales in its GEMM); False sends bf16 rows (bf16 experts: the same inputs as the other
        backends give them)."""
        pick_mode(mode, None, hidden_size)  # validates the mode and the hidden size
        self.ll_fp8 = ll_fp8
        world_size = group.size()
        check_experts_divisible(num_experts, world_size)
        self.group, self.mode, self.num_experts, self.hidden_size = group, mode, num_experts, hidden_size
        self.num_local_experts = num_experts // world_size
        self.ll_max_tokens = ll_max_tokens or min(max_tokens_per_rank, LL_MAX_TOKENS)
        self.shared = get_buffer(group, hidden_size, num_experts, self.ll_max_tokens)
        self.buffer = self.shared.buffer
        # What a CUDA-graph replay needs done on the host first: the process's one buffer, shared by all layers
        self.graph_replay_state = self.shared

    @property
    def SYNC_FREE_DECODE(self) -> bool:  # noqa: N802 - the attribute the other dispatchers define as a constant
        """Decode steps run the low-latency kernels (no host sync, capturable) when this model has them."""
        return pick_mode(self.mode, False, self.hidden_size) == "low_latency"

    def step_mode(self, is_prefill: bool | None) -> str:
        """The kernels of a step whose group-agreed mode is `is_prefill` (None: unknown -> normal)."""
        return pick_mode(self.mode, is_prefill, self.hidden_size)

    @staticmethod
    def _check_dtype(hidden: torch.Tensor) -> None:
        if hidden.dtype != torch.bfloat16:
            raise ValueError(
                f"the deepep MoE backend moves bfloat16 activations, got {hidden.dtype}: serve with --dtype bfloat16"
            )

    # -- normal mode ----------------------------------------------------------------------------------
    def _normal_dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> Any:
        topk_idx = topk_ids.to(torch.int64)
        self.shared.last_mode = "normal"
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(
            topk_idx, self.num_experts
        )
        recv_x, recv_idx, recv_weights, _, deep_handle, _ = self.buffer.dispatch(
            hidden,
            topk_idx=topk_idx,
            topk_weights=topk_weights.float(),  # DeepEP takes float32 weights
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
        )
        order, token_index, counts, valid = permute_by_expert_on_device(recv_idx, self.num_local_experts)
        handle = _NormalHandle(deep_handle, order, valid, recv_weights, recv_x.shape[0])
        return DispatchedTokens(recv_x[token_index], None, handle, counts=counts)

    def _normal_combine(self, expert_output: torch.Tensor, h: _NormalHandle) -> torch.Tensor:
        # Weight and sum hits per received token here; DeepEP's normal combine then sums across ranks.
        combined, _, _ = self.buffer.combine(reduce_received(expert_output, h), h.deep_handle)
        return combined

    # -- low-latency mode -----------------------------------------------------------------------------
    def _ll_dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Any:
        check_ll_tokens(hidden.shape[0], self.ll_max_tokens)
        self.shared.clean_for_low_latency()  # after normal kernels used the shared memory
        topk_idx = topk_ids.to(torch.int64)
        packed, counts, deep_handle, _, hook = self.buffer.low_latency_dispatch(
            hidden, topk_idx, self.ll_max_tokens, self.num_experts, use_fp8=self.ll_fp8, return_recv_hook=True
        )
        return packed, counts, _LowLatencyHandle(deep_handle, topk_idx, topk_weights.float(), hook)

    def _ll_finish(self, pending: Any) -> DispatchedTokens:
        packed, counts, handle = pending
        handle.hook()  # receive: the sends were issued in dispatch_start
        # FP8 rows and their scales go to the experts as they came (no dequantisation here): the masked
        # fused-MoE kernel reads rows [e, :counts[e]] only and applies the scales inside its GEMM.
        rows, scales = packed if self.ll_fp8 else (packed, None)
        return DispatchedTokens(
            rows,
            None,
            handle,
            counts=counts,
            scales=scales,
            expected_rows=handle.topk_idx.numel() or None,  # this rank's hits: the balanced share
        )

    def _ll_combine(self, expert_output: torch.Tensor, h: _LowLatencyHandle) -> Any:
        combined, _, hook = self.buffer.low_latency_combine(
            expert_output, h.topk_idx, h.topk_weights, h.deep_handle, return_recv_hook=True
        )
        return combined, hook

    # -- TokenDispatcher ------------------------------------------------------------------------------
    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        self._check_dtype(hidden)
        if self.step_mode(is_prefill) == "normal":
            return ("normal", self._normal_dispatch(hidden, topk_ids, topk_weights))
        return ("low_latency", self._ll_dispatch(hidden, topk_ids, topk_weights))

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        mode, payload = pending
        return payload if mode == "normal" else self._ll_finish(payload)

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        if isinstance(dispatched.handle, _NormalHandle):
            return ("normal", self._normal_combine(expert_output, dispatched.handle))
        return ("low_latency", self._ll_combine(expert_output, dispatched.handle))

    def combine_finish(self, pending: Any) -> torch.Tensor:
        mode, payload = pending
        if mode == "normal":
            return payload  # type: ignore[no-any-return]
        combined, hook = payload
        hook()
        return combined  # type: ignore[no-any-return]


# ---- start-up self-check (auto) ---------------------------------------------------------------------------


def _stand_in_experts(rows: torch.Tensor, counts: torch.Tensor, first_expert: int) -> torch.Tensor:
    """Expert e multiplies its rows by (1 + e / 8): distinguishes experts, exact in bf16 for small e."""
    scale = 1 + (first_expert + torch.arange(counts.shape[0], device=rows.device, dtype=torch.float32)) / 8
    if rows.dim() == 3:  # masked layout
        return (rows.float() * scale[:, None, None]).to(rows.dtype)
    expert = torch.repeat_interleave(
        torch.arange(counts.shape[0], device=rows.device), counts.long(), output_size=None
    )
    out = torch.zeros_like(rows)
    n = expert.shape[0]
    out[:n] = (rows[:n].float() * scale[expert][:, None]).to(rows.dtype)
    return out


def self_check(
    group: dist.ProcessGroup, num_experts: int, hidden_size: int, max_tokens_per_rank: int
) -> tuple[bool, str]:
    """A tiny dispatch/combine round trip on DeepEP (normal, and low-latency when this hidden size has it)
    compared with the same computation done locally from the formula; every rank gets the group's verdict."""
    rank, world = dist.get_rank(group), group.size()
    device = torch.device("cuda", torch.cuda.current_device())
    detail = "ok"
    ok = True
    try:
        gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
        tokens, top_k = 8, min(4, num_experts)
        x = torch.randn(tokens, hidden_size, generator=gen).to(device, torch.bfloat16)
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]).to(
            device
        )
        w = torch.rand(tokens, top_k, generator=gen).to(device)
        scale = 1 + ids.float() / 8
        expected = (x.float()[:, None, :] * (w * scale)[..., None]).sum(1)
        num_local = num_experts // world
        modes = ["normal"] + (["low_latency"] if hidden_size in LL_HIDDEN_SIZES else [])
        for mode in modes:
            dispatcher = DeepEPDispatcher(
                group, num_experts, hidden_size, mode=mode, max_tokens_per_rank=max_tokens_per_rank
            )
            d = dispatcher.dispatch_finish(dispatcher.dispatch_start(x, ids, w, is_prefill=mode == "normal"))
            assert d.counts is not None
            out = _stand_in_experts(d.real_rows(), d.counts, rank * num_local)
            got = dispatcher.combine_finish(dispatcher.combine_start(out, d)).float()
            tol = 0.15 if mode == "low_latency" else 0.05  # FP8 dispatch vs bf16
            err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
            if not err <= tol:
                ok, detail = False, f"{mode}: relative error {err:.3g} > {tol}"
                break
            detail = f"{'+'.join(modes)} round trip within tolerance"
    except Exception as exc:  # the self-check decides, it must not take the process down
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    verdict = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    if ok and int(verdict.item()) == 0:
        ok, detail = False, "another rank's self-check failed"
    return ok, detail
