"""On an NVIDIA GPU: `MeteredDispatcher` over the device-count `LocalDispatcher` path issues no host
synchronisation while sampling (torch's sync debug mode set to error), its CUDA-event times and device byte
count are folded in once the events completed, and nothing is recorded during CUDA-graph capture; and
`moefleet bench --emulate-ep` at a small real width replays a decode CUDA graph. Skipped where no GPU is
visible (CI)."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import dispatch_metrics as dm
from moefleet.engine.dispatch_metrics import DispatchRecorder, MeteredDispatcher
from moefleet.engine.layers.token_dispatch import LocalDispatcher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _layer(d, hidden, ids, weights):
    dispatched = d.dispatch_finish(d.dispatch_start(hidden, ids, weights))
    return d.combine_finish(d.combine_start(dispatched.hidden, dispatched))


def test_sampling_on_cuda_never_syncs_and_counts_bytes():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    hidden = torch.randn(64, 256, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (64, 4), device=device)
    ids[:3, 0] = -1  # 3 padding hits
    weights = torch.rand(64, 4, device=device)
    recorder = DispatchRecorder(every=1)
    metered = MeteredDispatcher(LocalDispatcher(8), recorder, first=True)
    _layer(metered, hidden, ids, weights)  # warm-up (allocations)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _layer(metered, hidden, ids, weights)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    stats = recorder.stats()
    assert stats[dm.FORWARDS_KEY] == 4 and stats[dm.count_key("dispatch")] == 4
    assert stats[dm.count_key("combine")] == 4 and stats[dm.sum_key("dispatch")] > 0
    assert stats[dm.BYTES_KEY] == 4 * (64 * 4 - 3) * 256 * 2  # valid rows x hidden x bf16


def test_nothing_is_sampled_during_graph_capture():
    device = torch.device("cuda", torch.cuda.current_device())
    hidden = torch.randn(16, 64, device=device)
    ids = torch.randint(0, 4, (16, 2), device=device)
    weights = torch.rand(16, 2, device=device)
    recorder = DispatchRecorder(every=1)
    metered = MeteredDispatcher(LocalDispatcher(4), recorder, first=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        _layer(metered, hidden, ids, weights)  # warm-up outside capture
    torch.cuda.synchronize()
    before = recorder.stats()[dm.FORWARDS_KEY]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _layer(metered, hidden, ids, weights)
    graph.replay()
    torch.cuda.synchronize()
    assert recorder.stats()[dm.FORWARDS_KEY] == before


def test_emulated_decode_replays_a_graph():
    from moefleet.engine.bench.runner import BenchOptions, run_rank

    options = BenchOptions(
        preset="qwen3-30b-a3b", num_layers=2, mode="decode", batch_size=32, kv_len=256, steps=3, warmup=2,
        emulate_ep=16, breakdown=False,
    )  # fmt: skip
    result = run_rank(options).to_dict()
    # 128 experts over EP16 -> 8 per GPU; 32 tokens x top-8 rows.
    assert (result["experts_per_gpu"], result["routed_rows_per_layer"]) == (8, 256)
    assert result["cuda_graphs"].startswith("on") and result["host_syncs_per_step"] == 1
