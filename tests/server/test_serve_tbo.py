"""`moefleet serve --tbo on` with 2 ranks (one command, 2 processes; DP attention + EP MoE over gloo): greedy
answers over HTTP equal transformers' alone (the other rank idles through two empty micro-batches) and
concurrently (prompts longer than the prefill chunk), and /metrics counts the TBO steps."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server.conftest import complete_token_ids, stop_process, wait_for_banner_url
from support.reference import free_port, transformers_greedy
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.multiprocess]

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))
PROMPTS = [[5, 6, 7, 8], list(range(20, 41)), [300] * 9]
NEW_TOKENS = 6


def test_serve_with_tbo_on_answers_like_transformers():
    model = tiny_model_dir("qwen3_norm_topk")
    expected = transformers_greedy(model, PROMPTS, NEW_TOKENS, ignore_eos=True)  # as complete_token_ids
    command = [MOEFLEET, "serve", "--model", str(model), "--port", "0", "--print-examples"]
    command += ["--nproc-per-node", "2", "--tbo", "on"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "8"]
    command += ["--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    node = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = wait_for_banner_url(node, timeout=180)

        def complete(prompt: list[int]) -> list[int]:
            return complete_token_ids(url, model.name, prompt, NEW_TOKENS, timeout=120)

        assert complete(PROMPTS[1]) == expected[1]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(complete, PROMPTS)) == expected
        text = httpx.get(url + "/metrics", timeout=10).text
        got = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        # 21 prompt tokens in 8-token chunks + 5 decodes alone, then the concurrent round: > 8 TBO steps.
        assert got[("moefleet_tbo_steps_total", ())] > 8
        assert ("moefleet_tbo_split_imbalance", (("dp_rank", "1"),)) in got
    finally:
        code = stop_process(node)
    assert code == 0
