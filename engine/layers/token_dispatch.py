"""Token dispatch/combine: the seam between routing and expert computation.

A MoE layer does: route (gate, top-k) -> logical->physical map -> dispatch -> grouped experts -> combine.
The layer only talks to a `TokenDispatcher`; which one it holds decides whether experts are local
(`LocalDispatcher`, one rank) or spread over an expert-parallel group (`moefleet.engine.distributed`).
Launching a dispatch is separate from waiting for it so two-batch overlap can queue compute in between.
One dispatcher object per micro-batch: handles never cross dispatchers.
Nothing here is module-global: the step's mode reaches a dispatcher as `dispatch_start(..., is_prefill=)`,
taken by the MoE stages from the micro-batch's own ForwardBatch (`ForwardBatch.is_prefill`, group-agreed).

Shape legend: T tokens, K top-k, D hidden, E_local experts on this rank, N rows received (tokens x hits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class DispatchedTokens:
    """Rows routed to this rank's experts, grouped by local expert (expert 0's rows first); or, from a
    low-latency dispatcher, the masked layout [E_local, C, D] where expert e's valid rows are [e, :counts[e]].

    The low-latency DeepEP dispatcher hands over its FP8 rows as they came (no dequantisation): `hidden` is
    float8_e4m3fn [E_local, C, D] and `scales` float32 [E_local, C, D / 128] (value = fp8 * scale per row per
    128 columns; DeepEP's strides: column-major in the last two dims). `Experts.forward` takes both; other
    consumers that want real-valued rows call `kernels.fp8_masked.dequantize_masked` (valid rows only)."""

    hidden: torch.Tensor  # [N, D] (or [E_local, C, D]: masked)
    tokens_per_expert: list[int] | None  # [E_local] on the host, sums to the valid rows; or None, then:
    handle: Any  # opaque, passed back to combine
    # [E_local] on the device (no host sync); rows past their sum are padding the experts skip.
    counts: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # fp8 `hidden` only: per row per 128 columns (see above)
    # a host-side guess of the valid rows over all local experts (masked layout: sizes the expert kernel's
    # grid; any count is still computed right); None: the capacity
    expected_rows: int | None = None
    # prefill-mode steps on CUDA: a device->host copy of `counts` already under way (`HostCounts`)
    host_counts: HostCounts | None = None

    def real_rows(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """`hidden` as real values: as it is, or (FP8 masked rows) dequantised on the valid rows only into
        `dtype` (the other rows are undefined): for stand-in experts and checks, not for the expert path."""
        if self.scales is None:
            return self.hidden
        if not self.hidden.is_cuda:  # CPU (tests with a stand-in buffer): every row, from the formula
            group = self.hidden.shape[-1] // self.scales.shape[-1]
            return (self.hidden.float() * self.scales.float().repeat_interleave(group, -1)).to(dtype)
        from moefleet.engine.kernels.fp8_masked import dequantize_masked

        assert self.counts is not None, "FP8 masked rows come with device counts"
        return dequantize_masked(self.hidden, self.scales, self.counts, dtype)


@dataclass(eq=False)
class HostCounts:
    """Per-expert row counts on their way to the host: a non-blocking copy into pinned memory launched on the
    dispatcher's stream right where the counts are computed, and an event after it. `wait` blocks the host on
    that copy alone, not on everything the experts' stream has queued before it (under two-batch overlap the
    other micro-batch's attention: the host would learn the counts only once that finished, then launch the
    experts with the GPU idle). DeepEP's normal kernels hand the host its counts during dispatch the same way."""

    host: torch.Tensor  # pinned, [E_local]
    done: Any  # torch.cuda.Event recorded after the copy

    @classmethod
    def start(cls, counts: torch.Tensor) -> HostCounts | None:
        """Launch the copy on the current stream; None off CUDA or while a CUDA graph is captured (a replay
        would not refresh a host list)."""
        if not counts.is_cuda or torch.cuda.is_current_stream_capturing():
            return None
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(host, done)

    def wait(self) -> list[int]:
        self.done.synchronize()
        return [int(c) for c in self.host.tolist()]


def counts_on_host(counts: torch.Tensor, pending: HostCounts | None) -> list[int]:
    """Device `counts` as a host list: the dispatcher's copy already under way if there is one, else a copy
    now (which waits for everything queued on the current stream)."""
    return pending.wait() if pending is not None else [int(c) for c in counts.tolist()]


class TokenDispatcher(Protocol):
    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        """Launch sending `hidden` [T, D] to the ranks owning physical experts `topk_ids` [T, K].

        `is_prefill` is the step's group-agreed mode (`ForwardBatch.is_prefill` of this micro-batch; None =
        unknown): every rank of a group passes the same value, so a dispatcher with per-mode kernels (DeepEP
        normal / low-latency) picks the same kernels on every rank. Dispatchers with one kernel ignore it."""
        ...

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        """Wait for the dispatch launched by `dispatch_start` and return this rank's rows."""
        ...

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        """Launch sending unweighted expert outputs [N, D] back; top-k weights are applied here."""
        ...

    def combine_finish(self, pending: Any) -> torch.Tensor:
        """Wait for the combine and return [T, D]: sum over k of weight * expert output, original order."""
        ...


class ForwardingDispatcher:
    """A `TokenDispatcher` decorator: every call and every other attribute (`TBO_OVERLAP`, `SYNC_FREE_DECODE`,
    `graph_replay_state`, `pool`, ...) goes to `inner`; subclasses override the calls they change."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # only for names not set here: the inner dispatcher's
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        return self.inner.dispatch_start(hidden, topk_ids, topk_weights, is_prefill=is_prefill)

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        return self.inner.dispatch_finish(pending)  # type: ignore[no-any-return]

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        return self.inner.combine_start(expert_output, dispatched)

    def combine_finish(self, pending: Any) -> torch.Tensor:
        return self.inner.combine_finish(pending)  # type: ignore[no-any-return]


def permute_by_expert(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T*K (token, expert) hits by expert.

    Returns (order [T*K] indices into the flattened hits, sorted by expert and stable in token order;
    token_index [T*K] the source token of each sorted hit; counts [num_experts]).
    Ids < 0 (padding) are dropped: they sort last and are excluded from `order`.
    """
    flat = topk_ids.reshape(-1)
    top_k = topk_ids.shape[1] if topk_ids.dim() == 2 else 1
    valid = flat >= 0
    keys = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.sort(keys, stable=True).indices
    order = order[: int(valid.sum())]
    counts = torch.bincount(flat[valid], minlength=num_experts)
    return order, order // top_k, counts


def unpermute_and_reduce(
    sorted_output: torch.Tensor,
    order: torch.Tensor,
    topk_weights: torch.Tensor,
    num_tokens: int,
    *,
    valid: torch.Tensor | None = None,
    accumulate_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inverse of `permute_by_expert` (and of `permute_by_expert_on_device`): weight each hit's output and sum
    back per token -> [T, D] in `sorted_output`'s dtype.

    sorted_output [N, D] (hit i is flattened hit order[i] of `topk_weights` [T, K]); the weight multiply is in
    the output dtype. `valid` [N] (device path): rows where it is False are padding whose outputs are
    undefined; they contribute exact zeros (masked after the multiply, so NaN/inf garbage never leaks).
    `accumulate_dtype` (e.g. float32 for bf16 outputs): the per-token sum is done in it, then cast back.
    On CUDA the Triton gather-reduce (`kernels/moe_combine.py`) runs instead: weights applied and summed in
    float32, one rounding (more exact than this path in bf16; the summation order differs in float32)."""
    if sorted_output.is_cuda:  # one gather-reduce kernel: no atomics, no zero fill (kernels/moe_combine.py)
        from moefleet.engine.kernels.moe_combine import combine_rows, hit_positions

        if topk_weights.shape[0] != num_tokens:
            raise ValueError(f"topk_weights has {topk_weights.shape[0]} rows for {num_tokens} tokens")
        return combine_rows(sorted_output, hit_positions(order, topk_weights.numel(), valid), topk_weights)
    top_k = topk_weights.shape[1]
    weights = topk_weights.reshape(-1)[order].to(sorted_output.dtype).unsqueeze(1)
    weighted = sorted_output * weights
    if valid is not None:
        weighted = torch.where(valid[:, None], weighted, torch.zeros_like(weighted))
    acc_dtype = accumulate_dtype or sorted_output.dtype
    out = torch.zeros(num_tokens, sorted_output.shape[1], dtype=acc_dtype, device=sorted_output.device)
    out.index_add_(0, order // top_k, weighted.to(acc_dtype))
    return out.to(sorted_output.dtype)


def permute_by_expert_on_device(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`permute_by_expert` without a host synchronisation (CUDA-graph capturable): all T*K hits are kept,
    padding hits (ids < 0) sorted last; returns (order [T*K], token_index [T*K], counts [num_experts],
    valid [T*K] per sorted hit). Rows past sum(counts) are padding: their outputs must be ignored."""
    flat = topk_ids.reshape(-1)
    top_k = topk_ids.shape[1] if topk_ids.dim() == 2 else 1
    keys = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.sort(keys, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))  # no bincount: its size syncs
    return order, order // top_k, counts[:num_experts], keys[order] < num_experts


@dataclass
class _LocalHandle:
    order: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens: int
    valid: torch.Tensor | None = None  # per sorted hit, on the device path


class LocalDispatcher:
    """All experts live on this rank: dispatch is a permutation, combine its weighted inverse."""

    TBO_OVERLAP = "none"  # nothing to communicate

    def __init__(self, num_local_experts: int):
        self.num_local_experts = num_local_experts

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        if hidden.is_cuda:  # counts stay on the device: no host sync, so the decode step can be captured
            order, token_index, counts, valid = permute_by_expert_on_device(topk_ids, self.num_local_experts)
            # prefill: the experts may want host counts (per-expert cuBLAS): start their copy before the rows move
            on_host = HostCounts.start(counts) if is_prefill else None
            handle = _LocalHandle(order, topk_weights, hidden.shape[0], valid)
            return DispatchedTokens(hidden[token_index], None, handle, counts=counts, host_counts=on_host)
        order, token_index, host_counts = permute_by_expert(topk_ids, self.num_local_experts)
        handle = _LocalHandle(order, topk_weights, hidden.shape[0])
        return DispatchedTokens(hidden[token_index], host_counts.tolist(), handle)

    def dispatch_finish(self, pending: Any) -> DispatchedTokens:
        return pending

    def combine_start(self, expert_output: torch.Tensor, dispatched: DispatchedTokens) -> Any:
        h: _LocalHandle = dispatched.handle  # padding rows (device path: valid False) contribute zeros
        return unpermute_and_reduce(expert_output, h.order, h.topk_weights, h.num_tokens, valid=h.valid)

    def combine_finish(self, pending: Any) -> torch.Tensor:
        return pending
