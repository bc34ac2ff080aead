"""The `nvlink` dispatcher with every rank's buffers in one process (`SimGroup`): ranks driven one after another
(a barrier is then a no-op), stand-in experts, the dense formula. Shared by the CPU test (interpreted kernels)
and the 1-GPU test (compiled kernels, real atomics)."""

from __future__ import annotations

import torch
from moefleet.engine.distributed.nvlink import NvlinkDispatcher, NvlinkPool, SimFabric, SimGroup
from moefleet.engine.kernels.nvlink_ep import dispatch_reference

HIDDEN = 40  # not a power of two: the copy loops' column masks


def make_ranks(
    world: int, num_local: int, max_tokens: int, device: str = "cpu", **kwargs
) -> list[NvlinkDispatcher]:
    sim = SimGroup(world, torch.device(device))
    return [
        NvlinkDispatcher(
            NvlinkPool(SimFabric(sim, r)),
            world * num_local,
            HIDDEN,
            max_tokens,
            decode_tokens=max_tokens,
            **kwargs,
        )
        for r in range(world)
    ]


def distinct_routing(gen: torch.Generator, tokens: int, top_k: int, num_experts: int) -> torch.Tensor:
    rows = [torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]
    return torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.int64)


def stand_in_experts(rows: torch.Tensor, counts: torch.Tensor, first_expert: int) -> torch.Tensor:
    """expert e (global id) multiplies its rows by (e + 1); rows past the counts come out NaN (must not leak)."""
    out = torch.full_like(rows, float("nan"))
    for local, count in enumerate(counts.tolist()):
        out[local, :count] = rows[local, :count] * (first_expert + local + 1)
    return out


def formula(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    factor = torch.where(ids >= 0, ids + 1, torch.zeros_like(ids)).to(x.dtype)
    return (weights * factor).sum(1, keepdim=True) * x


def run_layer(
    ranks: list[NvlinkDispatcher], xs, ids, weights, *, check_rows: bool = True
) -> list[torch.Tensor]:
    world, num_local = len(ranks), ranks[0].num_local_experts
    pending = [
        d.dispatch_start(x, i, w, is_prefill=False)
        for d, x, i, w in zip(ranks, xs, ids, weights, strict=True)
    ]
    dispatched = [d.dispatch_finish(p) for d, p in zip(ranks, pending, strict=True)]
    if check_rows:
        expected = [dispatch_reference(x, i, world, num_local) for x, i in zip(xs, ids, strict=True)]
        for dst, got in enumerate(dispatched):
            assert got.hidden.shape == (num_local, world * ranks[dst].decode_tokens, HIDDEN)
            for local in range(num_local):
                want = sorted(
                    (src, hit, tuple(row.tolist()))
                    for src in range(world)
                    for hit, row in expected[src][dst][local]
                )
                count = int(got.counts[local])
                h = got.handle
                sources = h.ws.recv_src[local, :count].tolist()
                hits_per_rank = h.ws.shape.cap.hits
                have = sorted(
                    (s // hits_per_rank, s % hits_per_rank, tuple(got.hidden[local, slot].tolist()))
                    for slot, s in enumerate(sources)
                )
                assert have == want, f"rank {dst} expert {local}"
    # FP8 rows (fp8_rows=True): the stand-ins see them dequantised (`real_rows`, the formula on CPU)
    outs = [
        stand_in_experts(got.real_rows(xs[0].dtype), got.counts, dst * num_local)
        for dst, got in enumerate(dispatched)
    ]
    back = [d.combine_start(o, got) for d, o, got in zip(ranks, outs, dispatched, strict=True)]
    return [d.combine_finish(b) for d, b in zip(ranks, back, strict=True)]
