"""`/metrics` of a DP group describes the whole group, not its front-end rank.

The unit tests feed `ServerMetrics` hand-written per-rank stats and check the exported text against sums done
by hand; the multi-process test runs `moefleet serve` with 4 ranks on CPU, holds 8 long streams open and reads
`moefleet_num_requests_running == 8` (rank 0 alone holds 2 of them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from moefleet.engine.server.metrics import ServerMetrics, rank_series_name
from prometheus_client.parser import text_string_to_metric_families
from server.conftest import stop_process, wait_for_banner_url
from support.reference import free_port
from support.tiny_models import tiny_model_dir

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))

RANKS = [
    {"num_running": 2, "num_waiting": 1, "kv_blocks_used": 6, "kv_blocks_total": 10, "kv_usage": 0.6},
    {"num_running": 3, "num_waiting": 0, "kv_blocks_used": 9, "kv_blocks_total": 10, "kv_usage": 0.9},
    {"num_running": 0, "num_waiting": 4, "kv_blocks_used": 0, "kv_blocks_total": 20, "kv_usage": 0.0},
]
for _rank, _preemptions in zip(RANKS, (1, 0, 5), strict=True):
    _rank["num_preemptions_total"] = _preemptions


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def parse_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(httpx.get(url + "/metrics", timeout=10).text)


def test_group_gauges_are_sums_over_the_ranks_and_each_rank_is_labelled():
    metrics = ServerMetrics(lambda: RANKS[0], lambda: RANKS)
    got = samples(metrics.render().decode())
    # Hand-computed: 2+3+0 running, 1+0+4 waiting, 6+9+0 of 10+10+20 blocks, 1+0+5 preemptions.
    assert got[("moefleet_num_requests_running", ())] == 5
    assert got[("moefleet_num_requests_waiting", ())] == 5
    assert got[("moefleet_kv_cache_blocks_used", ())] == 15
    assert got[("moefleet_kv_cache_blocks_capacity", ())] == 40
    assert got[("moefleet_kv_cache_usage_ratio", ())] == pytest.approx(15 / 40)  # not the mean ratio 0.5
    assert got[("moefleet_num_preemptions_total", ())] == 6
    for rank, (running, usage) in enumerate([(2, 0.6), (3, 0.9), (0, 0.0)]):
        label = (("dp_rank", str(rank)),)
        assert got[(rank_series_name("moefleet_num_requests_running"), label)] == running
        assert got[("moefleet_dp_rank_kv_cache_usage_ratio", label)] == pytest.approx(usage)
    assert ("moefleet_dp_rank_num_requests_running", (("dp_rank", "3"),)) not in got


def test_single_engine_exports_its_preemptions():
    got = samples(ServerMetrics(lambda: RANKS[2]).render().decode())
    assert got[("moefleet_num_preemptions_total", ())] == 5
    assert got[("moefleet_num_requests_waiting", ())] == 4
    assert got[("moefleet_dp_rank_num_requests_waiting", (("dp_rank", "0"),))] == 4


def test_node_without_ranks_to_export_has_no_load_gauges():
    """A node that is not its group's front end: no load series, so summing over pods counts once."""
    got = samples(ServerMetrics(lambda: RANKS[0], lambda: []).render().decode())
    assert not [key for key in got if "requests_running" in key[0] or "kv_cache" in key[0]]
    assert got[("moefleet_requests_total", (("finish_reason", "stop"),))] == 0


def _hold_stream(url: str, model: str, opened: threading.Semaphore, stop: threading.Event) -> None:
    body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 400, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        announced = False
        for line in response.iter_lines():  # keep reading (the server streams) until told to leave
            if line.startswith("data: ") and not announced:
                announced = True
                opened.release()
            if stop.is_set():
                return  # leaving drops the connection: the request is aborted


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_eight_streams_over_four_ranks_read_eight_running():
    """8 long streams over 4 ranks: /metrics reads 8 running (the group), not rank 0's share of them."""
    model = tiny_model_dir("qwen3_norm_topk")
    command = [MOEFLEET, "serve", "--model", str(model), "--port", "0", "--print-examples"]
    command += ["--nproc-per-node", "4", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "32"]
    command += ["--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        url = wait_for_banner_url(server, timeout=180)
        opened = threading.Semaphore(0)
        threads = [
            threading.Thread(target=_hold_stream, args=(url, model.name, opened, stop), daemon=True)
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert opened.acquire(timeout=120), "a stream produced no token"
        # Every stream has produced a token and has hundreds to go: all 8 run. The gauges refresh each step.
        deadline = time.monotonic() + 30
        while True:
            got = parse_metrics(url)
            per_rank = {
                labels: value
                for (name, labels), value in got.items()
                if name == "moefleet_dp_rank_num_requests_running"
            }
            if got[("moefleet_num_requests_running", ())] == 8 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got[("moefleet_num_requests_running", ())] == 8, got
        assert sorted(per_rank) == [(("dp_rank", str(rank)),) for rank in range(4)]
        assert sum(per_rank.values()) == 8 and max(per_rank.values()) < 8  # spread, and every rank counted
        assert got[("moefleet_kv_cache_blocks_used", ())] == sum(
            got[("moefleet_dp_rank_kv_cache_blocks_used", (("dp_rank", str(r)),))] for r in range(4)
        )
        assert got[("moefleet_num_preemptions_total", ())] == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        assert stop_process(server) == 0
