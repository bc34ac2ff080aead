"""MoE dispatch metrics of decode steps replayed from CUDA graphs (engine/dispatch_metrics.py), on CPU: a fake
GPU stands in for the CUDA events. A "capture" turns the metered dispatchers' event records into graph nodes,
a "replay" re-records them (not complete until the fake GPU runs), and `elapsed_time` raises on an event that
has not completed, as torch's does: so a sample read too early, or after a newer replay of its graph was
launched, fails here. The real events inside a captured graph: tests/gpu/test_dispatch_metrics_gpu.py."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import dispatch_metrics as dm
from moefleet.engine.dispatch_metrics import DispatchRecorder, MeteredDispatcher, recorder_of
from moefleet.engine.layers.token_dispatch import DispatchedTokens, LocalDispatcher
from support.fake_cuda_events import FakeGPU, capture


class DeviceCountDispatch:
    """A sync-free dispatcher's output: rows [N, D] with device counts (`counts.sum()` rows are valid), as
    symm / DeepEP / the local device path return them; identity combine."""

    def __init__(self, counts: list[int], dim: int):
        self.counts, self.dim = torch.tensor(counts, dtype=torch.int32), dim

    def dispatch_start(self, hidden, ids, weights, *, is_prefill=None):
        return hidden

    def dispatch_finish(self, hidden):
        rows = torch.zeros(int(self.counts.sum()) + 3, self.dim)  # 3 padding rows: not counted
        return DispatchedTokens(rows, None, hidden, counts=self.counts)

    def combine_start(self, out, dispatched):
        return dispatched.handle

    def combine_finish(self, pending):
        return pending


DIM = 8


def _model(recorder: DispatchRecorder):
    """Two MoE layers: host counts (LocalDispatcher on CPU: 5 tokens x top-2, one padding hit -> 9 rows) and
    device counts (3 + 4 rows)."""
    layers = [LocalDispatcher(4), DeviceCountDispatch([3, 4], DIM)]
    return [MeteredDispatcher(d, recorder, first=i == 0) for i, d in enumerate(layers)]


ROWS_PER_FORWARD = 9 + 7
BYTES_PER_FORWARD = ROWS_PER_FORWARD * DIM * 4  # float32 rows


def _forward(dispatchers):
    torch.manual_seed(0)
    hidden = torch.randn(5, DIM)
    ids = torch.randint(0, 4, (5, 2))
    ids[0, 1] = -1
    weights = torch.rand(5, 2)
    out = hidden
    for d in dispatchers:
        dispatched = d.dispatch_finish(d.dispatch_start(out, ids, weights))
        out = d.combine_finish(d.combine_start(dispatched.hidden, dispatched))  # identity experts
    return out


def _capture(recorder: DispatchRecorder, gpu: FakeGPU, dispatchers):
    """A fake capture of one forward: (probe, the graph's event nodes)."""
    return capture(recorder, gpu, lambda: _forward(dispatchers))


def _replay(probe, gpu: FakeGPU, nodes) -> None:
    """What CudaGraphRunner.replay does around the launch."""
    probe.before_replay()
    gpu.replay(nodes)
    probe.after_replay()


def test_capture_records_four_events_per_layer_and_samples_nothing_eagerly():
    recorder = DispatchRecorder(every=1)
    gpu = FakeGPU()
    probe, nodes = _capture(recorder, gpu, _model(recorder))
    assert [part for part, _, _ in probe.spans] == ["dispatch", "combine", "dispatch", "combine"]
    assert len(nodes) == 8 and all(event.timing for event in nodes)  # 2 layers x (start, end) x 2 parts
    assert recorder.probe is None and recorder.probes == [probe]
    # host counts are a constant of the graph; device counts are summed by a captured op, no .item()
    assert probe.host_bytes == 9 * DIM * 4
    assert list(probe.rows) == [DIM * 4] and [int(r) for r in probe.rows[DIM * 4]] == [7]
    stats = recorder.stats()
    assert (recorder.forwards, stats[dm.FORWARDS_KEY], stats[dm.count_key("dispatch")]) == (0, 0, 0)


def test_every_nth_replay_is_harvested_only_once_complete_with_eager_keys():
    recorder = DispatchRecorder(every=2)
    gpu = FakeGPU(ms=0.5)
    probe, nodes = _capture(recorder, gpu, _model(recorder))
    _replay(probe, gpu, nodes)  # forward 0: sampled, armed
    assert probe.armed is not None and probe.armed.done in gpu.queue  # done event queued behind the graph
    assert recorder.stats()[dm.count_key("dispatch")] == 0  # not complete: nothing read, nothing waited for
    gpu.run()
    stats = recorder.stats()
    assert stats[dm.FORWARDS_KEY] == 1
    assert stats[dm.count_key("dispatch")] == 2 and stats[dm.count_key("combine")] == 2
    # consecutive events 0.5 ms apart on the fake GPU: each dispatch and combine spans one step
    assert stats[dm.sum_key("dispatch")] == pytest.approx(2 * 0.5e-3)
    assert stats[dm.bucket_key("dispatch", dm.SECONDS_BUCKETS.index(500e-6))] == 2
    assert stats[dm.bucket_key("dispatch", dm.SECONDS_BUCKETS.index(250e-6))] == 0
    assert stats[dm.BYTES_KEY] == BYTES_PER_FORWARD
    _replay(probe, gpu, nodes)  # forward 1: not sampled
    assert probe.armed is None
    _replay(probe, gpu, nodes)  # forward 2: sampled; harvested by the next launch of the same graph
    gpu.run()
    _replay(probe, gpu, nodes)  # forward 3
    assert probe.armed is None and probe.harvested == 2 and probe.dropped == 0
    stats = recorder.stats()
    assert (stats[dm.FORWARDS_KEY], stats[dm.count_key("combine")]) == (2, 4)
    assert stats[dm.BYTES_KEY] == 2 * BYTES_PER_FORWARD
    assert recorder.forwards == 4 and probe.replays == 4
    # the same keys as eager samples (what /metrics exports)
    eager = DispatchRecorder(every=1)
    _forward(_model(eager))
    eager_stats = eager.stats()
    assert set(eager_stats) == set(stats)
    assert eager_stats[dm.BYTES_KEY] == BYTES_PER_FORWARD  # the same bytes per sampled forward


def test_a_sample_still_running_when_its_graph_is_launched_again_is_dropped():
    recorder = DispatchRecorder(every=2)
    gpu = FakeGPU()
    probe, nodes = _capture(recorder, gpu, _model(recorder))
    _replay(probe, gpu, nodes)  # sampled, armed, not complete
    _replay(probe, gpu, nodes)  # relaunch re-records the events: the armed sample is dropped, never read
    assert probe.armed is None and probe.dropped == 1 and recorder.graph_samples_dropped == 1
    gpu.run()
    stats = recorder.stats()
    assert (stats[dm.FORWARDS_KEY], stats[dm.count_key("dispatch")], stats[dm.BYTES_KEY]) == (0, 0, 0)
    _replay(probe, gpu, nodes)  # the next sample of the same graph is read normally
    gpu.run()
    assert recorder.stats()[dm.count_key("dispatch")] == 2 and probe.harvested == 1


def test_each_graph_keeps_its_own_events_and_forwards_are_counted_across_graphs():
    """Two buckets: a replay of one graph never settles the other's sample; eager and replayed forwards share
    one one-in-N counter."""
    recorder = DispatchRecorder(every=2)
    gpu = FakeGPU()
    dispatchers = _model(recorder)
    small, small_nodes = _capture(recorder, gpu, dispatchers)
    large, large_nodes = _capture(recorder, gpu, dispatchers)
    assert not {id(e) for e in small_nodes} & {id(e) for e in large_nodes}
    _replay(large, gpu, large_nodes)  # forward 0: sampled
    _replay(small, gpu, small_nodes)  # forward 1: not sampled; large's sample stays armed
    assert large.armed is not None and large.dropped == 0
    gpu.run()
    _forward(dispatchers)  # forward 2, eager: sampled (CPU perf_counter)
    _replay(small, gpu, small_nodes)  # forward 3
    stats = recorder.stats()
    assert recorder.forwards == 4 and stats[dm.FORWARDS_KEY] == 2
    assert stats[dm.count_key("dispatch")] == 4 and stats[dm.BYTES_KEY] == 2 * BYTES_PER_FORWARD


def test_paused_forwards_and_failed_captures_leave_no_trace():
    recorder = DispatchRecorder(every=1)
    gpu = FakeGPU()
    dispatchers = _model(recorder)
    probe, nodes = _capture(recorder, gpu, dispatchers)
    with recorder.pause():
        _forward(dispatchers)  # a warm-up: not counted, not sampled
        _replay(probe, gpu, nodes)
        gpu.run()
        with recorder.pause():
            pass
        assert recorder.paused  # nested pauses restore the outer state
    assert not recorder.paused and probe.armed is None
    assert recorder.forwards == 0 and recorder.stats()[dm.FORWARDS_KEY] == 0
    with pytest.raises(RuntimeError, match="capture broke"), recorder.capture(make_event=gpu.event):
        raise RuntimeError("capture broke")
    assert recorder.probe is None and recorder.probes == [probe]
    recorder.forget([probe])
    assert recorder.probes == []


def test_recorder_of_finds_the_metered_dispatchers():
    layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
    for layer in layers:
        layer.dispatchers = [LocalDispatcher(2)]
        layer.dispatcher = layer.dispatchers[0]
    assert recorder_of(layers) is None  # metrics off: the graph runner captures no probe
    recorder = DispatchRecorder(every=1)
    dm.install_dispatch_metrics(layers, recorder)
    assert recorder_of(layers) is recorder
    assert recorder_of(object()) is None
