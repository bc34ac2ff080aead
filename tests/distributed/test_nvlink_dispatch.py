"""The `nvlink` dispatcher's cross-rank logic on CPU: every rank's buffers in one process (`SimGroup`), the real
Triton kernels interpreted, ranks driven one after another (a barrier is then a no-op), against the formula
out[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t]) with stand-in experts."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.distributed import nvlink
from moefleet.engine.distributed.nvlink import NvlinkDispatcher, NvlinkPool, SimFabric, SimGroup
from support.nvlink_sim import HIDDEN, distinct_routing, formula, make_ranks, run_layer, stand_in_experts


@pytest.mark.parametrize(
    ("world", "num_local", "tokens", "top_k"),
    [(2, 3, [5, 3], 2), (3, 2, [4, 0, 6], 3), (2, 4, [1, 1], 4)],
)
def test_rows_reach_their_experts_and_come_back_weighted(world, num_local, tokens, top_k):
    gen = torch.Generator().manual_seed(world * 100 + top_k)
    ranks = make_ranks(world, num_local, max(tokens))
    num_experts = world * num_local
    for layer in range(2):  # the second layer reuses the workspace: counters must have been reset
        xs = [torch.randn(t, HIDDEN, generator=gen) for t in tokens]
        ids = [distinct_routing(gen, t, top_k, num_experts) for t in tokens]
        if layer == 1 and tokens[0] > 1:
            ids[0][1, -1] = -1  # a padding hit
        weights = [torch.rand(t, top_k, generator=gen) for t in tokens]
        outs = run_layer(ranks, xs, ids, weights)
        for out, x, i, w in zip(outs, xs, ids, weights, strict=True):
            torch.testing.assert_close(out, formula(x, i, w), rtol=1e-5, atol=1e-5)
    assert all(d.pool.dropped() == 0 for d in ranks)


def test_skewed_and_maximal_routings():
    world, num_local, tokens, top_k = 2, 4, 6, 4
    gen = torch.Generator().manual_seed(7)
    ranks = make_ranks(world, num_local, tokens)
    xs = [torch.randn(tokens, HIDDEN, generator=gen) for _ in range(world)]
    weights = [torch.rand(tokens, top_k, generator=gen) for _ in range(world)]
    maximal = torch.tensor([[4, 5, 6, 7]] * tokens)  # every hit of both ranks to rank 1: its full capacity
    skewed = torch.stack(
        [torch.cat([torch.tensor([0]), torch.randperm(7, generator=gen)[:3] + 1]) for _ in range(tokens)]
    )
    for ids in ([maximal, maximal], [skewed, maximal]):
        outs = run_layer(ranks, xs, ids, weights)
        for out, x, i, w in zip(outs, xs, ids, weights, strict=True):
            torch.testing.assert_close(out, formula(x, i, w), rtol=1e-5, atol=1e-5)
    assert all(d.pool.dropped() == 0 for d in ranks)


def test_two_micro_batches_in_flight_use_two_workspaces():
    world, num_local, tokens, top_k = 2, 2, 3, 2
    gen = torch.Generator().manual_seed(3)
    sim = SimGroup(world, torch.device("cpu"))
    pools = [NvlinkPool(SimFabric(sim, r)) for r in range(world)]
    mbs = [
        [NvlinkDispatcher(pools[r], world * num_local, HIDDEN, tokens) for r in range(world)]
        for _ in range(2)
    ]
    data = [
        [
            (
                torch.randn(tokens, HIDDEN, generator=gen),
                distinct_routing(gen, tokens, top_k, 4),
                torch.rand(tokens, top_k, generator=gen),
            )
            for _ in range(world)
        ]
        for _ in range(2)
    ]
    # both micro-batches dispatch before either combines (the TBO launch order)
    pending = [
        [d.dispatch_start(x, i, w, is_prefill=False) for d, (x, i, w) in zip(mbs[m], data[m], strict=True)]
        for m in range(2)
    ]
    dispatched = [[d.dispatch_finish(p) for d, p in zip(mbs[m], pending[m], strict=True)] for m in range(2)]
    assert dispatched[0][0].hidden.data_ptr() != dispatched[1][0].hidden.data_ptr()
    for m in (1, 0):
        outs = [stand_in_experts(g.hidden, g.counts, r * num_local) for r, g in enumerate(dispatched[m])]
        back = [d.combine_start(o, g) for d, o, g in zip(mbs[m], outs, dispatched[m], strict=True)]
        for d, b, (x, i, w) in zip(mbs[m], back, data[m], strict=True):
            torch.testing.assert_close(d.combine_finish(b), formula(x, i, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="at most 2"):
        for _ in range(3):
            mbs[0][0].pool.lease(mbs[0][0]._shape(tokens, top_k, torch.float32))


def test_a_repeating_router_is_dropped_and_counted_not_written_out_of_bounds():
    world, num_local, tokens = 2, 2, 3
    ranks = make_ranks(world, num_local, tokens)
    x = [torch.randn(tokens, HIDDEN) for _ in range(world)]
    ids = [torch.zeros(tokens, 2, dtype=torch.int64) for _ in range(world)]  # expert 0 twice per token
    w = [torch.ones(tokens, 2) for _ in range(world)]
    pending = [
        d.dispatch_start(a, b, c, is_prefill=False) for d, a, b, c in zip(ranks, x, ids, w, strict=True)
    ]
    got = [d.dispatch_finish(p) for d, p in zip(ranks, pending, strict=True)]
    cap = world * tokens
    assert int(got[0].counts[0]) == 2 * world * tokens  # the counter saw every hit
    assert sum(d.pool.dropped() for d in ranks) == 2 * world * tokens - cap  # the rest were dropped


def test_decode_batch_larger_than_the_buffers_is_refused_with_the_flag_to_change():
    (d,) = make_ranks(1, 2, 4)
    with pytest.raises(ValueError, match="--max-num-seqs"):
        d.dispatch_start(
            torch.randn(5, HIDDEN), torch.zeros(5, 1, dtype=torch.int64), torch.ones(5, 1), is_prefill=False
        )


class Recording:
    """A prefill dispatcher that records what reached it and hands the rows to the experts as they are."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def dispatch_start(self, hidden, topk_ids, topk_weights, *, is_prefill=None):
        self.calls.append("dispatch_start")
        return hidden, topk_weights

    def dispatch_finish(self, pending):
        from moefleet.engine.layers.token_dispatch import DispatchedTokens

        self.calls.append("dispatch_finish")
        return DispatchedTokens(pending[0], [pending[0].shape[0]], pending[1])

    def combine_start(self, expert_output, dispatched):
        self.calls.append("combine_start")
        return expert_output * dispatched.handle.sum(1, keepdim=True)

    def combine_finish(self, pending):
        self.calls.append("combine_finish")
        return pending


def test_prefill_steps_too_large_for_the_buffers_go_to_the_prefill_dispatcher(monkeypatch):
    inner = Recording()
    (d,) = make_ranks(1, 2, 4, prefill=inner)
    x, ids, w = torch.randn(3, HIDDEN), torch.tensor([[0], [1], [0]]), torch.rand(3, 1)
    assert not d.uses_prefill_dispatcher(True, 1, torch.float32)  # small: prefill shares the buffers
    monkeypatch.setattr(nvlink, "PREFILL_BUDGET_BYTES", 0)
    assert d.uses_prefill_dispatcher(True, 1, torch.float32)
    assert d.uses_prefill_dispatcher(None, 1, torch.float32)  # unknown mode: the prefill path
    assert not d.uses_prefill_dispatcher(False, 1, torch.float32)  # decode: always these buffers
    got = d.dispatch_finish(d.dispatch_start(x, ids, w, is_prefill=True))
    out = d.combine_finish(d.combine_start(got.hidden * 2, got))
    assert inner.calls == ["dispatch_start", "dispatch_finish", "combine_start", "combine_finish"]
    torch.testing.assert_close(out, 2 * x * w)


def test_pure_sizing():
    cap = nvlink.capacity(256, 8, 2)
    assert (cap.rows_per_expert, cap.hits) == (512, 2048)
    # DeepSeek-V3 decode, EP2: 128 local experts x 512 rows x 7168 bf16, plus 2048 combine rows
    assert (
        nvlink.workspace_bytes(cap, 128, 7168, torch.bfloat16)
        == (128 * 512 + 2048) * 7168 * 2 + 128 * 512 * 4 + 128 * 4
    )
    assert not nvlink.shares_prefill(16384, 8, 2, 128, 7168, torch.bfloat16)  # 60 GB: prefill goes to a2a
    assert nvlink.shares_prefill(16384, 8, 2, 9, 7168, torch.bfloat16)  # EP32-shaped: 9 experts per GPU fit
    assert nvlink.return_row_groups(256, 8, 128, 512) == 16
    assert nvlink.return_row_groups(0, 8, 4, 512) == 1
    with pytest.raises(ValueError, match="positive"):
        nvlink.capacity(0, 8, 2)


def test_fp8_rows_carry_their_scales_to_the_experts():
    """fp8_rows (FP8 experts): the rows travel as float8_e4m3fn with one float32 scale per 128 columns; the
    experts get both (`DispatchedTokens.scales`), the combine stays in the activations' dtype."""
    world, num_local, tokens, top_k = 2, 3, [4, 2], 2
    gen = torch.Generator().manual_seed(11)
    ranks = make_ranks(world, num_local, max(tokens), fp8_rows=True)
    xs = [torch.randn(t, HIDDEN, generator=gen) for t in tokens]
    ids = [distinct_routing(gen, t, top_k, world * num_local) for t in tokens]
    weights = [torch.rand(t, top_k, generator=gen) for t in tokens]
    pending = [
        d.dispatch_start(x, i, w, is_prefill=False)
        for d, x, i, w in zip(ranks, xs, ids, weights, strict=True)
    ]
    got = [d.dispatch_finish(p) for d, p in zip(ranks, pending, strict=True)]
    assert got[0].hidden.dtype == torch.float8_e4m3fn and got[0].scales.shape == (num_local, world * 4, 1)
    outs = [stand_in_experts(g.real_rows(torch.float32), g.counts, r * num_local) for r, g in enumerate(got)]
    back = [d.combine_start(o, g) for d, o, g in zip(ranks, outs, got, strict=True)]
    for d, b, x, i, w in zip(ranks, back, xs, ids, weights, strict=True):
        out = d.combine_finish(b)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, formula(x, i, w), rtol=0.07, atol=0.07 * float(x.abs().max()))
    # the rows did travel as FP8: the last rank's sums differ from the exact formula by the quantisation error
    assert not torch.equal(out, formula(xs[-1], ids[-1], weights[-1]))


def test_reserve_allocates_decode_and_shared_prefill_workspaces_up_front(monkeypatch):
    sim = SimGroup(1, torch.device("cpu"))
    pool = NvlinkPool(SimFabric(sim, 0))
    NvlinkDispatcher(pool, 2, HIDDEN, 64, decode_tokens=8, prefill=Recording(), reserve=(2, torch.float32, 2))
    tokens = sorted(ws.shape.cap.tokens for ws in pool.workspaces())
    assert tokens == [8, 8, 64, 64]  # two micro-batches x (decode, prefill)
    assert not any(ws.in_use for ws in pool.workspaces())
    monkeypatch.setattr(nvlink, "PREFILL_BUDGET_BYTES", 0)  # prefill goes to the prefill dispatcher
    pool = NvlinkPool(SimFabric(SimGroup(1, torch.device("cpu")), 0))
    NvlinkDispatcher(pool, 2, HIDDEN, 64, decode_tokens=8, prefill=Recording(), reserve=(2, torch.float32, 2))
    assert sorted(ws.shape.cap.tokens for ws in pool.workspaces()) == [8, 8]
