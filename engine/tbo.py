"""Two-batch overlap (TBO): one step's ForwardBatch runs as two micro-batches whose decoder stages interleave,
so one micro-batch's compute is queued while the other communicates (dispatch / combine of the MoE layers).

    plan = plan_split(fb.query_lens, fb.seq_lens)      # pure: where to cut (decode: sequences; else tokens)
    children = split_batch(fb, plan)                   # two ForwardBatches (one may be empty: T = 0)
    hidden = forward_tbo(model, fb)                    # [T, D] in fb's token order, ready for sampling

Stages come from `DecoderLayer.stages()` (models/base.py): attention + router | dispatch | experts + shared |
combine for a MoE layer, one stage for a dense one; layers are concatenated so the overlap crosses layer
boundaries. On one stream (CPU, DeepEP's receive hooks) micro-batch 0 runs `STAGE_LEAD` stages ahead of
micro-batch 1 (`schedule`): with a lead of 2, each blocking dispatch of one micro-batch comes after the other
micro-batch's latest compute stage was issued (the launch-order rule: on a GPU that compute is queued before
the CPU blocks on receive counts). With a comm stream (`stream_schedule`) the lead is 1 and a tick's comm
stage goes first, so the in-order compute stream gets the two micro-batches' compute stages alternately and
never holds one micro-batch's experts (waiting for its dispatch) ahead of the other's attention.
Micro-batch i uses `layer.dispatchers[i]` on every MoE layer (handles never cross micro-batches). Every rank
of a group runs the same schedule (an idle rank: two empty micro-batches), so the collectives line up.

Prefill cuts by balanced attention cost: a new token at position p attends to p + 1 keys; the cut may fall
inside one sequence (its first piece goes to micro-batch 0, which writes that piece's KV at each layer before
micro-batch 1's piece reads it - the schedule runs micro-batch 0's stage i before micro-batch 1's stage i).
Chunked prefill: a chunk's already-cached prefix counts in its tokens' cost and stays in the KV cache.
On CUDA the stages run through an `Overlap` (tbo_streams.py): a2a and symm put every dispatch / combine on a
comm stream ordered by events, DeepEP low-latency overlaps through its receive hooks; on CPU the stages run in
launch order on one stream. A decode split builds its children as views of the parent's tensors (no host
copy), so the TBO decode step can be captured in a CUDA graph (cuda_graph_runner.py, `tbo=True`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .config import TBO_MODES
from .forward_batch import ForwardBatch, ForwardMode
from .tbo_streams import COMM, Overlap, StreamedDispatcher, StreamOverlap, make_overlap

# THE `--tbo auto` threshold table (the one place; docs/distributed.md "TBO auto thresholds" records the runs):
# tokens per rank at and above which `auto` uses TBO, per mode. Fill in from benchmarks/gpu_tbo.sh (on/off
# ratio per point): the smallest measured point from which every larger point has on/off >= 1.0 (decode:
# tokens/GPU = sequences/GPU; prefill: new tokens/GPU). None = not measured yet, so `auto` stays off.
AUTO_MIN_TOKENS: dict[str, int | None] = {
    # 2x H200, DeepSeek-V3 width, 2 layers (2026-11-30, docs/distributed.md): on/off 0.78 / 0.71 / 0.68 / 0.65
    # at 32 / 64 / 128 / 256 tokens/GPU with symm (0.59 with a2a at 256): TBO loses at every decode point
    "decode": None,
    # on/off 0.90 / 0.95 / 1.106 at 4k / 8k / 16k tokens/GPU with symm, 0.997 with a2a at 16k: off until a
    # margin shows for the default backend too (the threshold is per mode, not per backend). Both rows were
    # measured with the lead-2 order on a comm stream (now `stream_schedule`): stale until re-measured. With
    # emulated inter-node transfers (wall-clock waits, 61-layer projection, 1x H200, 2026-12-01 14:23 UTC):
    # decode 0.80 / 1.14 / 1.16 / 1.25-1.28 at 0 / 300 / 450 / 600 us per dispatch and per combine, prefill
    # 1.156 at 5 ms; with the high-priority comm stream decode 1.205 at 300 us and 1.27-1.38 at 600 us; one NVLink node's transfers are far shorter (~0.1 ms per layer predicted), where TBO
    # loses (0.80 with none), so both stay off until a 2-GPU run measures the default backend
    "prefill": None,
}
# Stages micro-batch 0 runs ahead of micro-batch 1: one stream (launch order, DeepEP hooks; the CPU path), and
# with a comm stream (`stream_schedule`).
STAGE_LEAD = 2
STREAM_LEAD = 1


def wants_tbo(mode: str, num_tokens: int, is_prefill: bool) -> bool:
    """Pure: whether this rank can use TBO for a batch (`StepInfo.can_use_tbo`; the group uses it only if
    every rank with work can)."""
    if mode not in TBO_MODES:
        raise ValueError(f"tbo ({mode!r}) must be one of {TBO_MODES}")
    if mode != "auto":
        return mode == "on"
    threshold = AUTO_MIN_TOKENS["prefill" if is_prefill else "decode"]
    return threshold is not None and num_tokens >= threshold


def num_micro_batches(mode: str) -> int:
    """Dispatchers each MoE layer needs (`apply_expert_parallel(num_micro_batches=...)`) for a `--tbo` mode."""
    measured = any(threshold is not None for threshold in AUTO_MIN_TOKENS.values())
    return 2 if mode == "on" or (mode == "auto" and measured) else 1


# ---- where to cut (pure) --------------------------------------------------------------------------------


def attention_cost(query_len: int, seq_len: int, num_tokens: int) -> int:
    """Keys attended by the first `num_tokens` new tokens of a sequence (token at position p: p + 1 keys)."""
    cached = seq_len - query_len
    return num_tokens * cached + num_tokens * (num_tokens + 1) // 2


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """Micro-batch 0 takes sequences [0, seq_cut) and the first `cut_tokens` new tokens of sequence seq_cut
    (0: no sequence is cut); micro-batch 1 takes the rest. `costs` is the attention cost of each side."""

    seq_cut: int
    cut_tokens: int
    token_cut: int  # new tokens of micro-batch 0
    costs: tuple[int, int]

    @property
    def imbalance(self) -> float:
        """|cost0 - cost1| / (cost0 + cost1): 0 is a perfect split, 1 everything on one side."""
        total = sum(self.costs)
        return abs(self.costs[0] - self.costs[1]) / total if total else 0.0


def plan_split(query_lens: Sequence[int], seq_lens: Sequence[int]) -> SplitPlan:
    """Decode (every sequence one token): the first ceil(B/2) sequences, the rest. Otherwise: the token cut
    with the most even attention cost, each side at least one token (one sequence may be cut)."""
    num_seqs = len(query_lens)
    costs = [attention_cost(q, s, q) for q, s in zip(query_lens, seq_lens, strict=True)]
    if all(q == 1 for q in query_lens):
        half = (num_seqs + 1) // 2
        return SplitPlan(half, 0, half, (sum(costs[:half]), sum(costs[half:])))
    total = sum(costs)
    best: tuple[int, int, int, int] | None = None  # (|2 * left - total|, seq, tokens, left)
    prefix = 0
    for b, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if 2 * (prefix + costs[b]) >= total:  # the balance point is inside sequence b: search its tokens
            lo, hi = 0, q
            while lo < hi:
                mid = (lo + hi) // 2
                if 2 * (prefix + attention_cost(q, s, mid)) >= total:
                    hi = mid
                else:
                    lo = mid + 1
            for k in (lo - 1, lo):
                if 0 <= k <= q:
                    left = prefix + attention_cost(q, s, k)
                    if best is None or abs(2 * left - total) < best[0]:
                        best = (abs(2 * left - total), b, k, left)
            break
        prefix += costs[b]
    assert best is not None
    _, b, k, left = best
    before = sum(query_lens[:b])
    token_cut = min(max(before + k, 1), sum(query_lens) - 1)  # both sides non-empty
    if token_cut != before + k:  # clamped: recompute where the cut falls
        return _plan_at(query_lens, seq_lens, token_cut)
    return _normalize(query_lens, b, k, token_cut, (left, total - left))


def _plan_at(query_lens: Sequence[int], seq_lens: Sequence[int], token_cut: int) -> SplitPlan:
    before, left = 0, 0
    for b, (q, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if before + q >= token_cut:
            k = token_cut - before
            left += attention_cost(q, s, k)
            total = sum(attention_cost(q2, s2, q2) for q2, s2 in zip(query_lens, seq_lens, strict=True))
            return _normalize(query_lens, b, k, token_cut, (left, total - left))
        before += q
        left += attention_cost(q, s, q)
    raise ValueError(f"token cut {token_cut} is past the batch's {before} tokens")


def _normalize(
    query_lens: Sequence[int], seq: int, tokens: int, token_cut: int, costs: tuple[int, int]
) -> SplitPlan:
    """A cut at the end of a sequence is a cut before the next one (no sequence is cut)."""
    if tokens == query_lens[seq]:
        return SplitPlan(seq + 1, 0, token_cut, costs)
    return SplitPlan(seq, tokens, token_cut, costs)


# ---- the two micro-batches ------------------------------------------------------------------------------


def split_batch(fb: ForwardBatch, plan: SplitPlan) -> tuple[ForwardBatch, ForwardBatch]:
    """Two ForwardBatches over contiguous token ranges of `fb` ([0, token_cut), [token_cut, T)): token tensors
    are views of fb's, per-sequence tensors are built from the host lists (one small copy each). Children
    carry no sample indices: the merged hidden states are sampled with fb's. Each child carries the step's
    resolved mode (`dp_is_prefill = fb.is_prefill`): a micro-batch of a mixed step dispatches with the step's
    group-agreed kernels, not with a mode of its own."""
    c, k = plan.seq_cut, plan.cut_tokens
    q, s = fb.query_lens, fb.seq_lens
    if k:  # sequence c is cut: KV length after its first piece is its cached prefix + k
        first = (q[:c] + [k], s[:c] + [s[c] - q[c] + k], c + 1)
        second = ([q[c] - k] + q[c + 1 :], s[c:], c)
    else:
        first = (q[:c], s[:c], c)
        second = (q[c:], s[c:], c)
    t = plan.token_cut
    return (
        _child(fb, *first[:2], seqs=slice(0, first[2]), tokens=slice(0, t)),
        _child(fb, *second[:2], seqs=slice(second[2], fb.num_seqs), tokens=slice(t, fb.num_tokens)),
    )


def _child(
    fb: ForwardBatch, query_lens: list[int], seq_lens: list[int], seqs: slice, tokens: slice
) -> ForwardBatch:
    if not query_lens or fb.mode is ForwardMode.DECODE:
        # Decode (or an empty micro-batch: an idle batch, T = 0): per-sequence tensors are views of the
        # parent's (decode: cu_query_lens is 0..B; its first entry is 0 for any batch): no host copy, so a
        # CUDA graph can capture the split (the static buffers stay the graph's inputs).
        qlens, slens = fb.query_lens_t[seqs], fb.seq_lens_t[seqs]
        cu_t = fb.cu_query_lens[: len(query_lens) + 1]
    else:
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        host = torch.tensor(query_lens + seq_lens + cu, dtype=torch.int32)
        qlens, slens, cu_t = host.to(fb.input_ids.device, non_blocking=True).split(
            [len(query_lens), len(seq_lens), len(cu)]
        )
    return ForwardBatch(
        mode=ForwardMode.of(query_lens),
        block_size=fb.block_size,
        query_lens=query_lens,
        seq_lens=seq_lens,
        input_ids=fb.input_ids[tokens],
        positions=fb.positions[tokens],
        slot_mapping=fb.slot_mapping[tokens],
        query_lens_t=qlens,
        seq_lens_t=slens,
        cu_query_lens=cu_t,
        block_tables=fb.block_tables[seqs],
        sample_indices=fb.sample_indices[:0],
        block_tables_cpu=fb.block_tables_cpu[seqs],
        dp_is_prefill=fb.is_prefill,
        attn_backend=fb.attn_backend,
        for_cuda_graph=fb.for_cuda_graph,
    )


# ---- interleaving ---------------------------------------------------------------------------------------


def schedule(
    num_stages: int, lead: int = STAGE_LEAD, kinds: Sequence[str] | None = None
) -> list[tuple[int, int]]:
    """Pure: (micro-batch, stage index) in launch order. Tick i runs micro-batch 0's stage i and micro-batch 1's
    stage i - lead: micro-batch 0's first, or with `kinds` (each stage's "compute" / "comm") the comm stage
    first. Either way micro-batch 0's stage i precedes micro-batch 1's (lead >= 1)."""
    if lead < 0:
        raise ValueError(f"lead ({lead}) must be >= 0")
    order = []
    for tick in range(num_stages + lead):
        pair = []
        if tick < num_stages:
            pair.append((0, tick))
        if 0 <= tick - lead < num_stages:
            pair.append((1, tick - lead))
        if kinds is not None:
            pair.sort(key=lambda p: kinds[p[1]] != COMM)  # stable: comm first, then compute
        order += pair
    return order


def stream_schedule(kinds: Sequence[str]) -> list[tuple[int, int]]:
    """Pure: the launch order for the comm-stream mechanism (one in-order compute stream, one comm stream):
    lead 1, comm first within a tick, so the compute stream receives the two micro-batches' compute stages
    alternately (attention 0, attention 1, experts 0, experts 1, ...) and the comm stream their transfers in
    the order they become ready (dispatch 0, dispatch 1, combine 0, combine 1, ...). Micro-batch 1's attention
    then runs while micro-batch 0 dispatches, and so on. (The lead-2 order queues micro-batch 0's experts -
    which wait for its dispatch - ahead of micro-batch 1's attention on the compute stream: that stream then
    stalls through every dispatch, which is what the 2026-11-30 2x H200 run measured.)"""
    return schedule(len(kinds), STREAM_LEAD, kinds)


def check_supported(model: Any) -> None:
    """TBO needs a `DecoderModel` (`model.model`) whose layers expose `stages()`."""
    from .models.base import DecoderModel

    decoder = getattr(model, "model", None)
    if not isinstance(decoder, DecoderModel) or not all(hasattr(layer, "stages") for layer in decoder.layers):
        raise ValueError(
            f"two-batch overlap needs a decoder model with staged layers; {type(model).__name__} has none: "
            "use --tbo off"
        )


def forward_tbo(
    model: Any,
    fb: ForwardBatch,
    lead: int | None = None,
    overlap: Overlap | None = None,
    timer: Any = None,
) -> tuple[torch.Tensor, SplitPlan]:
    """Forward `fb` as two interleaved micro-batches; returns (final hidden [T, D] in fb's token order, the
    split plan). The result equals `model(fb.input_ids, fb.positions, fb)` up to floating-point reordering
    of batched matmuls. `overlap` runs the stages (default: `make_overlap` for the model and device); the
    launch order is the overlap's (`stream_schedule` with a comm stream, else `schedule` with lead 2) unless
    `lead` is given; `timer` (tbo_timeline.StageTimer) records each stage's span on its stream."""
    from .models.base import LayerState

    plan = plan_split(fb.query_lens, fb.seq_lens)
    children = split_batch(fb, plan)
    decoder = model.model
    states = [
        LayerState(child.positions, decoder.embed_tokens(child.input_ids), child, micro_batch=i)
        for i, child in enumerate(children)
    ]
    run = overlap if overlap is not None else make_overlap(model, fb.input_ids.device)
    run.timer = timer
    if isinstance(run, StreamOverlap):  # combine_start launches from inside the experts stage: divert it
        for i, state in enumerate(states):
            state.wrap_dispatcher = partial(StreamedDispatcher, overlap=run, micro_batch=i)
    stages = [stage for layer in decoder.layers for stage in layer.stages()]
    kinds = [kind for layer in decoder.layers for kind in layer.stage_kinds()]
    if lead is None:  # the mechanism's order: comm stream -> stream_schedule, one stream -> lead 2
        order = stream_schedule(kinds) if isinstance(run, StreamOverlap) else schedule(len(stages))
    else:
        order = schedule(len(stages), lead)
    for micro_batch, index in order:
        run.run(micro_batch, kinds[index], stages[index], states[micro_batch])
    run.finish()
    hidden = torch.cat([state.hidden for state in states])
    return decoder.norm(hidden), plan
