"""Multi-process `moefleet serve` on CPU (DP attention + expert-parallel MoE over gloo), 2 nodes x 2 processes
started as two separate commands: greedy answers over HTTP equal transformers' for both architectures, with
one request at a time (three ranks idle) and concurrent requests, prompts longer than the prefill chunk;
Ctrl-C on node 0 shuts the whole group down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from moefleet.engine.cli import main
from server.conftest import complete_token_ids, stop_process, wait_for_banner_url
from support.reference import free_port, transformers_greedy
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.multiprocess]

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))
NAME = "qwen3_norm_topk"
NAMES = ["qwen3_norm_topk", "deepseek_grouped"]
PROMPTS = [[5, 6, 7, 8], list(range(20, 50)), [300] * 9, [11, 400, 12, 401, 13, 402]]
NEW_TOKENS = 8


def _start_node(model: Path, node_rank: int, master_port: int) -> subprocess.Popen:
    command = [MOEFLEET, "serve", "--model", str(model), "--port", "0", "--print-examples"]
    command += ["--nnodes", "2", "--node-rank", str(node_rank), "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    command += ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "16"]
    command += ["--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.parametrize("name", NAMES)
def test_two_nodes_of_two_ranks_serve_like_transformers(name):
    """2 nodes x 2 processes on this machine: 4 ranks, a quarter of the experts each; node 0 serves the API,
    node 1 answers its pod's probes; Ctrl-C on node 0 stops the whole group cleanly."""
    model = tiny_model_dir(name)
    expected = transformers_greedy(model, PROMPTS, NEW_TOKENS, ignore_eos=True)  # as complete_token_ids

    master_port = free_port()
    nodes = [_start_node(model, rank, master_port) for rank in (0, 1)]
    try:
        front_end, worker = (wait_for_banner_url(node, timeout=180) for node in nodes)

        def complete(prompt: list[int]) -> list[int]:
            return complete_token_ids(front_end, model.name, prompt, NEW_TOKENS, timeout=120)

        # Alone: one rank works, three run idle steps. The 30-token prompt takes two 16-token chunks.
        assert complete(PROMPTS[1]) == expected[1]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # together: requests spread over the four ranks
            assert list(pool.map(complete, PROMPTS)) == expected
        assert httpx.get(front_end + "/health", timeout=10).status_code == 200

        # Node 1 answers probes but sends clients to node 0, whose /metrics covers node 1's ranks too.
        assert httpx.get(worker + "/health", timeout=10).json() == {"status": "ok"}
        worker_metrics = httpx.get(worker + "/metrics", timeout=10).text
        assert "moefleet_requests_total" in worker_metrics and "moefleet_kv_cache" not in worker_metrics
        front_end_metrics = httpx.get(front_end + "/metrics", timeout=10).text
        assert 'moefleet_dp_rank_kv_cache_blocks_capacity{dp_rank="3"}' in front_end_metrics
        refused = httpx.post(
            worker + "/v1/completions", json={"model": model.name, "prompt": [5]}, timeout=10
        )
        assert refused.status_code == 503 and "send requests to node 0" in refused.json()["error"]["message"]
    finally:
        front_end_code = stop_process(nodes[0])
        try:  # node 1 must leave by itself, on the front end's Shutdown
            worker_code = nodes[1].wait(timeout=60)
        finally:
            stop_process(nodes[1])
    assert (front_end_code, worker_code) == (0, 0)


def test_experts_must_divide_over_the_ranks(capsys):
    model = tiny_model_dir(NAME)
    experts = json.loads((model / "config.json").read_text())["num_experts"]
    assert experts % 3
    assert main(["serve", "--model", str(model), "--port", "0", "--nproc-per-node", "3"]) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert f"num_experts ({experts}) is not divisible by expert-parallel size (3)" in error
