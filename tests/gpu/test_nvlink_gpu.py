"""On one NVIDIA GPU: the `nvlink` dispatcher's kernels compiled (system-scope atomics, pointer tables) with two
ranks' buffers on the one GPU (`SimGroup`), at a tiny width (every row checked) and at DeepSeek-V3 width (bf16,
the formula); and the production fabric (torch symmetric memory, its barrier) in a one-rank NCCL group,
eagerly with no host synchronisation and replayed from a CUDA graph. The 2-GPU checks (peers over NVLink,
`moefleet serve --moe-backend nvlink`) are in test_ep_backends_gpu.py. Skipped without CUDA (CI)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from support.nvlink_sim import distinct_routing, formula, make_ranks, run_layer, stand_in_experts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("tokens", [[5, 3], [0, 7]])
def test_two_simulated_ranks_tiny_width_every_row(tokens):
    gen = torch.Generator().manual_seed(sum(tokens))
    ranks = make_ranks(2, 3, 8, device="cuda")
    for _ in range(2):
        xs = [torch.randn(t, 40, generator=gen).cuda() for t in tokens]
        ids = [distinct_routing(gen, t, 3, 6).cuda() for t in tokens]
        ws = [torch.rand(t, 3, generator=gen).cuda() for t in tokens]
        for out, x, i, w in zip(run_layer(ranks, xs, ids, ws), xs, ids, ws, strict=True):
            torch.testing.assert_close(out, formula(x, i, w), rtol=1e-5, atol=1e-5)
    assert all(d.pool.dropped() == 0 for d in ranks)


@pytest.mark.parametrize("fp8_rows", [False, True])
def test_two_simulated_ranks_deepseek_width_bf16(fp8_rows):
    gen = torch.Generator().manual_seed(1)
    world, num_local, top_k, hidden = 2, 128, 8, 7168
    from moefleet.engine.distributed.nvlink import NvlinkDispatcher, NvlinkPool, SimFabric, SimGroup

    sim = SimGroup(world, torch.device("cuda"))
    ranks = [
        NvlinkDispatcher(NvlinkPool(SimFabric(sim, r)), world * num_local, hidden, 256, fp8_rows=fp8_rows)
        for r in range(world)
    ]
    tokens = [256, 100]
    xs = [torch.randn(t, hidden, generator=gen).cuda().bfloat16() for t in tokens]
    ids = [distinct_routing(gen, t, top_k, world * num_local).cuda() for t in tokens]
    ws = [torch.rand(t, top_k, generator=gen).cuda() for t in tokens]
    pending = [
        d.dispatch_start(x, i, w, is_prefill=False) for d, x, i, w in zip(ranks, xs, ids, ws, strict=True)
    ]
    got = [d.dispatch_finish(p) for d, p in zip(ranks, pending, strict=True)]
    assert [int(g.counts.sum()) for g in got] == [
        sum(int(((i // num_local) == r).sum()) for i in ids) for r in range(world)
    ]
    assert (got[0].scales is not None) == fp8_rows
    outs = [stand_in_experts(g.real_rows(torch.bfloat16), g.counts, r * num_local) for r, g in enumerate(got)]
    back = [d.combine_start(o, g) for d, o, g in zip(ranks, outs, got, strict=True)]
    for d, b, x, i, w in zip(ranks, back, xs, ids, ws, strict=True):
        want = formula(x.float(), i, w)
        err = float((d.combine_finish(b).float() - want).abs().max() / want.abs().max())
        assert err < (0.1 if fp8_rows else 2e-2)


@pytest.fixture(scope="module")
def one_rank_group():
    device = torch.device("cuda", torch.cuda.current_device())
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    yield dist.group.WORLD, device
    dist.destroy_process_group()


def test_symmetric_memory_fabric_round_trip_no_sync_and_graph_replay(one_rank_group):
    from moefleet.engine.distributed.nvlink import NvlinkDispatcher, workspace_pool

    group, device = one_rank_group
    tokens, top_k, experts, hidden = 16, 4, 8, 128
    d = NvlinkDispatcher(
        workspace_pool(group, device), experts, hidden, tokens, reserve=(top_k, torch.float32, 1)
    )
    x = torch.zeros(tokens, hidden, device=device)
    ids = torch.zeros(tokens, top_k, dtype=torch.int64, device=device)
    w = torch.zeros(tokens, top_k, device=device)

    def fill(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        ids.copy_(distinct_routing(gen, tokens, top_k, experts))
        x.copy_(torch.randn(tokens, hidden, generator=gen))
        w.copy_(torch.rand(tokens, top_k, generator=gen))

    def trip() -> torch.Tensor:
        got = d.dispatch_finish(d.dispatch_start(x, ids, w, is_prefill=False))
        return d.combine_finish(d.combine_start(scaled(got.hidden), got))

    def scaled(rows: torch.Tensor) -> torch.Tensor:  # expert e scales by e + 1, sync-free
        return rows * torch.arange(1, experts + 1, device=device, dtype=rows.dtype)[:, None, None]

    fill(0)
    torch.testing.assert_close(trip(), formula(x, ids, w), rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        trip()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        trip()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = trip()
    for seed in (1, 2, 3):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize(device)
        torch.testing.assert_close(out, formula(x, ids, w), rtol=1e-5, atol=1e-5)
    assert d.pool.dropped() == 0
