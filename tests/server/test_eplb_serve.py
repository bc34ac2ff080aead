"""EPLB through `moefleet serve`: 2 nodes x 2 processes on CPU (gloo, float32) with 4 redundant experts
(8 + 4 = 12 slots, 3 per rank). Greedy answers equal transformers before, during (streams in flight while
POST /admin/eplb/rebalance moves weights) and after a rebalance; GET /admin/eplb reports the group-wide
state; /metrics of both nodes show the EPLB series; the admin routes refuse a wrong bearer token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server.conftest import complete_token_ids, stop_process, wait_for_banner_url
from support.reference import free_port, transformers_greedy
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow, pytest.mark.multiprocess]

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))
PROMPTS = [[5, 6, 7, 8], list(range(20, 50)), [300] * 9, [11, 400, 12, 401, 13, 402]]
NEW_TOKENS = 12
TOKEN = "eplb-test-token"


def _start_node(model: Path, node_rank: int, master_port: int, token_file: Path) -> subprocess.Popen:
    command = [MOEFLEET, "serve", "--model", str(model), "--port", "0", "--print-examples"]
    command += ["--nnodes", "2", "--node-rank", str(node_rank), "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    command += ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "16"]
    command += ["--num-redundant-experts", "4", "--eplb-window-steps", "200"]
    command += ["--admin-token-file", str(token_file), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOEFLEET_ADMIN_TOKEN", None)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def stream_token_ids(
    base: str, model: str, prompt: list[int], new_tokens: int, started: threading.Event
) -> list[int]:
    """Greedy streamed completion; sets `started` once the first token arrived."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    body |= {"ignore_eos": True, "return_token_ids": True}
    tokens: list[int] = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            tokens += chunk["choices"][0].get("token_ids") or []
            if tokens:
                started.set()
    return tokens


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_rebalance_over_http_while_streaming_keeps_greedy_outputs(tmp_path):
    model = tiny_model_dir("qwen3_norm_topk")
    expected = transformers_greedy(model, PROMPTS, NEW_TOKENS, ignore_eos=True)  # as complete_token_ids
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    auth = {"Authorization": f"Bearer {TOKEN}"}

    master_port = free_port()
    nodes = [_start_node(model, rank, master_port, token_file) for rank in (0, 1)]
    try:
        front_end, worker = (wait_for_banner_url(node, timeout=180) for node in nodes)

        def complete(prompt: list[int]) -> list[int]:
            return complete_token_ids(front_end, model.name, prompt, NEW_TOKENS, timeout=120)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # before: the start-up placement (slot p: p mod 8)
            assert list(pool.map(complete, PROMPTS)) == expected

        # Refusals: no bearer 401, wrong bearer 403 (OpenAI error shape); a right one reads the state.
        missing = httpx.get(front_end + "/admin/eplb", timeout=30)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
        wrong = httpx.post(
            front_end + "/admin/eplb/rebalance", headers={"Authorization": "Bearer x"}, timeout=30
        )
        assert wrong.status_code == 403 and "wrong" in wrong.json()["error"]["message"]
        state = httpx.get(front_end + "/admin/eplb", headers=auth, timeout=60).json()
        assert 0 < state["balancedness"] <= 1 and state["rebalances"] == 0 and state["window_steps"] > 0
        assert len(state["per_layer"]) == 2 and state["window_size_steps"] == 200
        assert state["placement"]["num_physical_experts"] == 12 and state["placement"]["slots_per_rank"] == 3

        # During: streams are producing tokens when the rebalance is requested.
        started = threading.Event()
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            streams = [
                pool.submit(stream_token_ids, front_end, model.name, p, NEW_TOKENS, started) for p in PROMPTS
            ]
            assert started.wait(120)
            reply = httpx.post(front_end + "/admin/eplb/rebalance", headers=auth, timeout=120)
            assert reply.status_code == 200, reply.text
            assert [s.result() for s in streams] == expected
        result = reply.json()
        assert {"balancedness_before", "predicted_balancedness", "pause_seconds", "moved_experts"} <= set(
            result
        )
        assert result["moved_experts"] > 0 and result["pause_seconds"] > 0
        assert 0 < result["balancedness_before"] <= result["predicted_balancedness"] <= 1

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # after: the new placement
            assert list(pool.map(complete, PROMPTS)) == expected
        after = httpx.get(front_end + "/admin/eplb", headers=auth, timeout=60).json()
        assert after["rebalances"] == 1 and max(after["placement"]["replicated_experts_per_layer"]) >= 1

        for base in (front_end, worker):  # every node's /metrics
            text = httpx.get(base + "/metrics", timeout=10).text
            assert _metric(text, "moefleet_eplb_rebalances_total") == 1
            assert 0 < _metric(text, "moefleet_eplb_balancedness") <= 1
            assert _metric(text, "moefleet_eplb_rebalance_seconds_count") == 1
            assert 'moefleet_eplb_layer_balancedness{layer="0"}' in text
            assert "moefleet_eplb_routed_tokens_total{rank=" in text
    finally:
        front_end_code = stop_process(nodes[0])
        try:
            worker_code = nodes[1].wait(timeout=60)
        finally:
            stop_process(nodes[1])
    assert (front_end_code, worker_code) == (0, 0)
