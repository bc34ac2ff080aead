"""Per-rank MoE dispatch/combine metrics: the sampling decorator over a real dispatcher (hand-counted rows,
bytes and samples), their export by `ServerMetrics` (hand-written per-rank stats), and a real 2-rank gloo
group (`moefleet serve --nproc-per-node 2`) whose /metrics shows both ranks' series."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from moefleet.engine import dispatch_metrics as dm
from moefleet.engine.dispatch_metrics import DispatchRecorder, MeteredDispatcher, install_dispatch_metrics
from moefleet.engine.layers.token_dispatch import LocalDispatcher
from moefleet.engine.server.metrics import ServerMetrics
from server.conftest import complete_token_ids, stop_process, wait_for_banner_url
from server.test_group_metrics import samples
from support.reference import free_port
from support.tiny_models import tiny_model_dir

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))


class _SlowDispatch(LocalDispatcher):
    def dispatch_finish(self, pending):
        time.sleep(0.003)
        return super().dispatch_finish(pending)


def _forward(dispatchers, hidden, ids, weights):
    out = hidden
    for d in dispatchers:  # one MoE layer each; identity experts
        dispatched = d.dispatch_finish(d.dispatch_start(out, ids, weights))
        out = d.combine_finish(d.combine_start(dispatched.hidden, dispatched))
    return out


def test_decorator_is_transparent_and_samples_every_nth_forward():
    torch.manual_seed(0)
    tokens, top_k, dim, experts = 5, 2, 8, 4
    hidden = torch.randn(tokens, dim)
    ids = torch.randint(0, experts, (tokens, top_k))
    ids[0, 1] = -1  # padding: not a row
    weights = torch.rand(tokens, top_k)
    recorder = DispatchRecorder(every=2)
    plain = [LocalDispatcher(experts), _SlowDispatch(experts)]
    metered = [MeteredDispatcher(d, recorder, first=i == 0) for i, d in enumerate(plain)]
    for _ in range(4):  # forwards 0 and 2 are sampled
        torch.testing.assert_close(
            _forward(metered, hidden, ids, weights), _forward(plain, hidden, ids, weights)
        )
    stats = recorder.stats()
    assert stats[dm.FORWARDS_KEY] == 2
    assert (
        stats[dm.count_key("dispatch")] == 4 and stats[dm.count_key("combine")] == 4
    )  # 2 forwards x 2 layers
    # 9 valid rows x 8 floats x 4 bytes, per layer and sampled forward.
    assert stats[dm.BYTES_KEY] == 4 * 9 * dim * 4
    # The slow layer's two dispatches took >= 3 ms: at most 2 of 4 fall in the buckets below 2.5 ms.
    below = dm.SECONDS_BUCKETS.index(2.5e-3)
    assert stats[dm.bucket_key("dispatch", below - 1)] <= 2
    assert stats[dm.sum_key("dispatch")] >= 2 * 0.003
    last = len(dm.SECONDS_BUCKETS)  # +Inf bucket is cumulative: every observation
    assert stats[dm.bucket_key("dispatch", last)] == 4


class _MaskedFp8Dispatch:
    """A low-latency-shaped dispatcher (DeepEP's output layout, CPU): FP8 rows [L, C, D] with per-128-column
    scales and device counts; combine returns zeros (only the bytes are checked here)."""

    def __init__(self, counts, capacity, dim):
        self.counts, self.capacity, self.dim = torch.tensor(counts, dtype=torch.int32), capacity, dim

    def dispatch_start(self, hidden, ids, weights, *, is_prefill=None):
        return hidden.shape[0]

    def dispatch_finish(self, tokens):
        from moefleet.engine.layers.token_dispatch import DispatchedTokens

        rows = torch.zeros(len(self.counts), self.capacity, self.dim, dtype=torch.float8_e4m3fn)
        scales = torch.ones(len(self.counts), self.capacity, self.dim // 128)
        return DispatchedTokens(rows, None, tokens, counts=self.counts, scales=scales)

    def combine_start(self, out, dispatched):
        return torch.zeros(dispatched.handle, self.dim)

    def combine_finish(self, pending):
        return pending


def test_masked_fp8_rows_count_their_width_and_scales():
    """Bytes of FP8 masked rows: valid rows x (D x 1 byte + D/128 float32 scales), not the capacity."""
    recorder = DispatchRecorder(every=1)
    metered = MeteredDispatcher(_MaskedFp8Dispatch([3, 0, 5], capacity=16, dim=256), recorder, first=True)
    dispatched = metered.dispatch_finish(metered.dispatch_start(torch.zeros(4, 256), None, None))
    metered.combine_finish(metered.combine_start(dispatched.real_rows(), dispatched))
    assert recorder.stats()[dm.BYTES_KEY] == 8 * (256 * 1 + 2 * 4)


def test_install_wraps_every_micro_batch_dispatcher():
    layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(3))
    for layer in layers:
        layer.dispatchers = [LocalDispatcher(2), LocalDispatcher(2)]
        layer.dispatcher = layer.dispatchers[0]
    recorder = DispatchRecorder(every=1)
    assert install_dispatch_metrics(layers, recorder) == 3
    firsts = [d.first for layer in layers for d in layer.dispatchers]
    assert firsts == [True, False, False, False, False, False]  # one sampling decision per forward
    assert all(layer.dispatcher is layer.dispatchers[0] for layer in layers)
    assert layers[0].dispatcher.num_local_experts == 2  # backend attributes still reachable


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match=r"MOEFLEET_MOE_METRICS_EVERY \(-1\) must be >= 0"):
        dm.every_from_env({"MOEFLEET_MOE_METRICS_EVERY": "-1"})
    assert dm.every_from_env({}) == dm.DEFAULT_EVERY


def _rank_stats(dispatch_per_bucket: list[int], total_s: float, sent: int) -> dict[str, float]:
    stats: dict[str, float] = {
        "num_running": 0,
        dm.BYTES_KEY: sent,
        dm.FORWARDS_KEY: 3,
        dm.DROPPED_KEY: sent // 1000,
    }
    for part in dm.PARTS:
        running = 0
        for i in range(len(dm.SECONDS_BUCKETS) + 1):
            running += dispatch_per_bucket[i] if i < len(dispatch_per_bucket) else 0
            stats[dm.bucket_key(part, i)] = running
        stats[dm.sum_key(part)] = total_s
        stats[dm.count_key(part)] = running
    return stats


def test_server_metrics_export_each_rank_with_a_dp_rank_label():
    ranks = [_rank_stats([0, 2, 1], 0.0002, 1000), _rank_stats([0, 0, 0, 0, 0, 5], 0.004, 2500)]
    got = samples(ServerMetrics(lambda: ranks[0], lambda: ranks).render().decode())
    # Rank 0: 2 samples <= 50 us, 3 <= 100 us; rank 1: 5 samples <= 1 ms.
    assert got[("moefleet_moe_dispatch_seconds_bucket", (("dp_rank", "0"), ("le", "5e-05")))] == 2
    assert got[("moefleet_moe_dispatch_seconds_bucket", (("dp_rank", "0"), ("le", "0.0001")))] == 3
    assert got[("moefleet_moe_combine_seconds_bucket", (("dp_rank", "1"), ("le", "0.0005")))] == 0
    assert got[("moefleet_moe_combine_seconds_bucket", (("dp_rank", "1"), ("le", "0.001")))] == 5
    assert got[("moefleet_moe_dispatch_seconds_count", (("dp_rank", "1"),))] == 5
    assert got[("moefleet_moe_dispatch_seconds_sum", (("dp_rank", "1"),))] == pytest.approx(0.004)
    assert got[("moefleet_moe_dispatch_bytes_total", (("dp_rank", "0"),))] == 1000
    assert got[("moefleet_moe_dispatch_bytes_total", (("dp_rank", "1"),))] == 2500
    assert got[("moefleet_moe_sampled_forwards_total", (("dp_rank", "1"),))] == 3
    assert got[("moefleet_moe_graph_samples_dropped_total", (("dp_rank", "0"),))] == 1
    assert got[("moefleet_moe_graph_samples_dropped_total", (("dp_rank", "1"),))] == 2
    # A single-process server (no expert-parallel dispatchers) exports none of them.
    assert not [
        k for k in samples(ServerMetrics(lambda: {"num_running": 0}).render().decode()) if "moe_" in k[0]
    ]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_rank_group_exports_both_ranks_dispatch_series():
    model = tiny_model_dir("qwen3_norm_topk")
    command = [MOEFLEET, "serve", "--model", str(model), "--port", "0", "--print-examples"]
    command += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "16"]
    command += ["--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEFLEET_MOE_METRICS_EVERY": "1"}
    node = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = wait_for_banner_url(node, timeout=240)
        assert len(complete_token_ids(url, model.name, list(range(20, 30)), 4, timeout=120)) == 4
        deadline = time.monotonic() + 30
        while True:  # rank stats reach the front end with the next exchange
            got = samples(httpx.get(url + "/metrics", timeout=10).text)
            counts = [got.get(("moefleet_moe_dispatch_seconds_count", (("dp_rank", r),)), 0) for r in "01"]
            if all(counts) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for rank in "01":
            label = (("dp_rank", rank),)
            assert got[("moefleet_moe_dispatch_seconds_count", label)] > 0
            assert got[("moefleet_moe_combine_seconds_count", label)] > 0
            assert got[("moefleet_moe_sampled_forwards_total", label)] > 0
            assert ("moefleet_moe_dispatch_bytes_total", label) in got
        # Rank 0 took the request: its experts received rows (10 prompt tokens x top-k, at least).
        assert (
            got[("moefleet_moe_dispatch_bytes_total", (("dp_rank", "0"),))]
            + got[("moefleet_moe_dispatch_bytes_total", (("dp_rank", "1"),))]
            > 0
        )
    finally:
        code = stop_process(node)
    assert code == 0
