"""On an NVIDIA GPU: `MeteredDispatcher` over the device-count `LocalDispatcher` path issues no host
synchronisation while sampling (torch's sync debug mode set to error), its CUDA-event times and device byte
count are folded in once the events completed, and a capture without a graph probe records nothing; decode
steps replayed from CUDA graphs are sampled through the probe captured in the graph (external timing events
and a device byte count; replays under sync debug mode "error"), directly and through `CudaGraphRunner` with a
tiny model; and `moefleet bench --emulate-ep` at a small real width replays a decode CUDA graph. Skipped where
no GPU is visible (CI). The bookkeeping on CPU: tests/engine/test_dispatch_metrics.py."""

from __future__ import annotations

import json
from contextlib import contextmanager

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


def test_nothing_is_sampled_during_a_capture_without_a_probe():
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


@contextmanager
def _no_host_sync():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


WAIT_US = 300  # emulated transfer per dispatch and per combine


def _cycles_per_us() -> float:
    """Clock cycles per microsecond of `torch.cuda._sleep` (a one-thread spin), measured now."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000)  # warm up
    times = []
    for _ in range(3):
        start.record()
        torch.cuda._sleep(2_000_000)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return 2_000_000 / sorted(times)[1]


class _TransferringDispatcher(LocalDispatcher):
    """The device-count local path plus an emulated transfer: dispatch_start and combine_start each hold the
    stream for `cycles` (WAIT_US), as an expert-parallel transfer would; no host sync, so it can be captured."""

    def __init__(self, num_experts, cycles):
        super().__init__(num_experts)
        self.cycles = cycles

    def dispatch_start(self, hidden, topk_ids, topk_weights, *, is_prefill=None):
        pending = super().dispatch_start(hidden, topk_ids, topk_weights, is_prefill=is_prefill)
        torch.cuda._sleep(self.cycles)
        return pending

    def combine_start(self, expert_output, dispatched):
        pending = super().combine_start(expert_output, dispatched)
        torch.cuda._sleep(self.cycles)
        return pending


def _emulated_layers(recorder, num_layers, num_experts):
    cycles = int(_cycles_per_us() * WAIT_US)
    return [
        MeteredDispatcher(_TransferringDispatcher(num_experts, cycles), recorder, first=i == 0)
        for i in range(num_layers)
    ]


def _check_times(stats, samples):
    """Every sampled dispatch / combine waited WAIT_US on the GPU: none under 100 us, none absurd."""
    for part in dm.PARTS:
        assert stats[dm.count_key(part)] == samples
        assert stats[dm.bucket_key(part, dm.SECONDS_BUCKETS.index(100e-6))] == 0, part
        assert stats[dm.bucket_key(part, dm.SECONDS_BUCKETS.index(0.25))] == samples, part
        assert stats[dm.sum_key(part)] >= 0.7 * WAIT_US * 1e-6 * samples, part


def _captured_emulated_step(every):
    """A graph of 2 metered layers with emulated transfers (bf16 [32, 256], top-4 of 8, 3 padding hits),
    captured with the recorder's probe open: (recorder, probe, graph, valid rows per layer, layers, D)."""
    device = torch.device("cuda", torch.cuda.current_device())
    tokens, top_k, dim, experts, num_layers = 32, 4, 256, 8, 2
    torch.manual_seed(0)
    hidden = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, experts, (tokens, top_k), device=device)
    ids[:3, 0] = -1  # 3 padding hits: not received rows
    weights = torch.rand(tokens, top_k, device=device)
    recorder = DispatchRecorder(every=every)
    layers = _emulated_layers(recorder, num_layers, experts)

    def step():
        out = hidden
        for d in layers:
            out = _layer(d, out, ids, weights)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), recorder.pause():  # warm-up: not a sample
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), recorder.capture() as probe:
        step()
    torch.cuda.synchronize()
    assert probe is not None and len(probe.spans) == 2 * num_layers
    assert [len(rows) for rows in probe.rows.values()] == [num_layers]  # device counts, one row size
    assert recorder.forwards == 0 and recorder.stats()[dm.FORWARDS_KEY] == 0
    return recorder, probe, graph, tokens * top_k - 3, num_layers, dim


def test_replayed_graph_is_sampled_without_host_syncs():
    """6 replays, one in 2 sampled, each followed by the step's host read (as the engine reads its tokens):
    3 samples, each layer's dispatch and combine >= the emulated wait, bytes = valid rows x D x 2 bytes."""
    recorder, probe, graph, rows, num_layers, dim = _captured_emulated_step(every=2)
    for _ in range(6):
        with _no_host_sync():
            probe.before_replay()
            graph.replay()
            probe.after_replay()
        torch.cuda.current_stream().synchronize()  # the engine's one host sync per step, outside the replay
    stats = recorder.stats()
    assert (probe.replays, probe.harvested, probe.dropped, recorder.forwards) == (6, 3, 0, 6)
    assert stats[dm.FORWARDS_KEY] == 3
    _check_times(stats, 3 * num_layers)
    assert stats[dm.BYTES_KEY] == 3 * num_layers * rows * dim * 2


def test_back_to_back_replays_drop_rather_than_misread():
    """Replays launched while the previous one still runs (1.2 ms of GPU waits each, microseconds to launch):
    an armed sample is dropped when its graph is launched again, never read; the last one is harvested once
    complete, with plausible values."""
    recorder, probe, graph, rows, num_layers, dim = _captured_emulated_step(every=1)
    with _no_host_sync():
        for _ in range(4):
            probe.before_replay()
            graph.replay()
            probe.after_replay()
    torch.cuda.synchronize()
    stats = recorder.stats()
    assert probe.harvested + probe.dropped == 4 and probe.dropped >= 1 and probe.harvested >= 1
    assert recorder.graph_samples_dropped == probe.dropped
    assert stats[dm.FORWARDS_KEY] == probe.harvested
    _check_times(stats, probe.harvested * num_layers)
    assert stats[dm.BYTES_KEY] == probe.harvested * num_layers * rows * dim * 2


def test_graph_runner_samples_replayed_decode_steps():
    """A tiny Qwen3-MoE (bf16) whose MoE layers dispatch through the emulated-transfer dispatcher with dispatch
    metrics, decode graph of bucket 4 captured by `CudaGraphRunner`: its warm-ups are not samples; 4 replays
    (3 live sequences + 1 padding row) under sync debug mode "error", every 2nd sampled: 2 samples per MoE
    layer with the emulated waits, bytes = 4 tokens x top-k rows x hidden x 2 bytes per layer and sample."""
    from moefleet.engine.attention.triton_backend import TritonAttentionBackend
    from moefleet.engine.cuda_graph_runner import CudaGraphRunner
    from moefleet.engine.dispatch_metrics import install_dispatch_metrics
    from moefleet.engine.distributed.ep import moe_layers
    from moefleet.engine.loader import load_model
    from support.tiny_models import PagedDriver, tiny_model_dir

    device = torch.device("cuda", torch.cuda.current_device())
    path = tiny_model_dir("qwen3_norm_topk")
    config = json.loads((path / "config.json").read_text())
    bucket = 4
    model = load_model(path, "cuda", torch.bfloat16)
    cycles = int(_cycles_per_us() * WAIT_US)
    num_layers = 0
    for _, layer in moe_layers(model):
        layer.dispatchers = [_TransferringDispatcher(len(layer.experts.local_experts), cycles)]
        layer.dispatcher = layer.dispatchers[0]
        num_layers += 1
    recorder = DispatchRecorder(every=2)
    assert install_dispatch_metrics(model, recorder) == num_layers >= 1
    backend = TritonAttentionBackend()
    driver = PagedDriver(
        model, num_blocks=32, block_size=16, dtype=torch.bfloat16, device="cuda", attn_backend=backend
    )
    runner = CudaGraphRunner(
        model, backend, max_batch_size=bucket, max_blocks_per_seq=4, block_size=16, device=device,
        sizes=[bucket],
    )  # fmt: skip
    runner.capture()
    assert set(runner.probes) == {bucket} and recorder.forwards == 0  # capture warm-ups: not samples
    assert len(runner.probes[bucket].spans) == 2 * num_layers
    with torch.inference_mode(), recorder.pause():
        driver.step([(s, list(range(3 + s, 12 + s))) for s in range(3)])  # eager prefill: not sampled
    batches = [driver.batch([(s, [20 + step]) for s in range(3)]) for step in range(4)]  # host->device now
    torch.cuda.synchronize()
    with torch.inference_mode():
        for batch in batches:
            with _no_host_sync():
                logits = runner.replay(batch)
            assert logits.shape[0] == 3 and len(logits.argmax(-1).tolist()) == 3  # the step's host read
    stats = recorder.stats()
    probe = runner.probes[bucket]
    assert (probe.replays, probe.harvested, probe.dropped) == (4, 2, 0)
    assert stats[dm.FORWARDS_KEY] == 2
    _check_times(stats, 2 * num_layers)
    rows = bucket * int(config["num_experts_per_tok"])  # padding rows are dispatched like real ones
    assert stats[dm.BYTES_KEY] == 2 * num_layers * rows * int(config["hidden_size"]) * 2
