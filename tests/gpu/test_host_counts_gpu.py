"""`HostCounts` (layers/token_dispatch.py) on an NVIDIA GPU: the host waits for the counts' own copy, launched
on the dispatcher's stream, not for what another stream (the experts' stream under two-batch overlap) has
queued; the local dispatcher starts it on prefill-mode steps only, never inside a CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.kernels.gpu_wait import gpu_wait
from moefleet.engine.layers.token_dispatch import HostCounts, LocalDispatcher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
DEV = torch.device("cuda", 0)


def test_wait_sees_the_final_counts_while_another_stream_is_still_busy():
    side = torch.cuda.Stream(DEV)
    base = torch.arange(8, device=DEV, dtype=torch.int32)
    side.wait_stream(torch.cuda.current_stream(DEV))
    with torch.cuda.stream(side):
        gpu_wait(20_000_000)  # the counts are computed 20 ms late on their own stream
        counts = base * 3
        pending = HostCounts.start(counts)
    assert pending is not None
    gpu_wait(2_000_000_000)  # the "experts" stream: busy for 2 s
    got = pending.wait()
    assert got == [3 * i for i in range(8)]
    assert not torch.cuda.current_stream(DEV).query()  # returned while the other stream still ran
    torch.cuda.synchronize(DEV)


def test_local_dispatcher_starts_the_copy_on_prefill_steps_only():
    dispatcher = LocalDispatcher(4)
    hidden = torch.randn(10, 16, device=DEV)
    ids = torch.tensor([[0, 3], [1, 1], [3, 2], [0, 0], [2, 3]] * 2, device=DEV)
    weights = torch.full((10, 2), 0.5, device=DEV)
    prefill = dispatcher.dispatch_finish(dispatcher.dispatch_start(hidden, ids, weights, is_prefill=True))
    decode = dispatcher.dispatch_finish(dispatcher.dispatch_start(hidden, ids, weights, is_prefill=False))
    assert decode.host_counts is None
    assert prefill.host_counts is not None
    assert prefill.host_counts.wait() == torch.bincount(ids.flatten(), minlength=4).tolist() == [6, 4, 4, 6]


def test_no_copy_inside_a_graph_capture():
    counts = torch.ones(4, device=DEV, dtype=torch.int32)
    graph = torch.cuda.CUDAGraph()
    seen = []
    stream = torch.cuda.Stream(DEV)
    stream.wait_stream(torch.cuda.current_stream(DEV))
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        seen.append(HostCounts.start(counts * 2))
    assert seen == [None]
