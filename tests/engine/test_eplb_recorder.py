"""EPLB load recorder: a window of buckets on device, read on demand, reset after a rebalance."""

from __future__ import annotations

import torch
from moefleet.engine.eplb.recorder import ExpertLoadRecorder


def test_window_keeps_recent_buckets_and_drops_old_ones():
    # window 4 steps -> 4 buckets of 1 step: the window is the last 3 finished steps + the current one.
    recorder = ExpertLoadRecorder(num_layers=1, num_logical=3, window_steps=4)
    for step in range(6):
        recorder.current[0, step % 3] += step + 1  # step s adds s+1 tokens to expert s mod 3
        recorder.step()
    # Steps 3, 4, 5 (adding 4, 5, 6 to experts 0, 1, 2) are in the ring; steps 0..2 fell out.
    assert recorder.local_window().tolist() == [[4, 5, 6]]
    assert recorder.read() == [[4, 5, 6]]
    recorder.current[0, 1] += 10  # the bucket being filled counts too
    assert recorder.read() == [[4, 15, 6]]
    assert recorder.routed_tokens_total() == sum(range(1, 7)) + 10
    recorder.reset()
    assert recorder.read() == [[0, 0, 0]] and recorder.steps_in_window == 0
    assert recorder.routed_tokens_total() == sum(range(1, 7)) + 10  # the counter never goes back


def test_large_window_uses_bounded_buckets():
    recorder = ExpertLoadRecorder(num_layers=2, num_logical=4, window_steps=1000)
    assert recorder.num_buckets == 16 and recorder.bucket_steps == 63
    assert recorder.ring.shape == (16, 2, 4)


def test_layers_write_into_their_row_on_device():
    recorder = ExpertLoadRecorder(num_layers=2, num_logical=4, window_steps=10)

    class Layer:
        expert_load: torch.Tensor | None = None

    layers = [Layer(), Layer()]
    recorder.attach(layers)  # type: ignore[arg-type]
    ids = torch.tensor([1, 1, 3])
    layers[1].expert_load.index_add_(0, ids, torch.ones_like(ids))  # what MoE.forward does
    assert recorder.read() == [[0, 0, 0, 0], [0, 2, 0, 1]]
