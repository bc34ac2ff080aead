"""`moefleet serve --nproc-per-node 2` on CPU: two ranks (DP attention + expert-parallel MoE over gloo),
HTTP on rank 0. Greedy answers equal the single-process engine's; Ctrl-C shuts the whole group down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from moefleet.engine.cli import main
from moefleet.engine.llm_engine import LLM
from moefleet.engine.sampling_params import SamplingParams
from server.conftest import wait_for_banner_url
from support.tiny_models import tiny_model_dir

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.multiprocess]

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))
NAME = "qwen3_norm_topk"
PROMPTS = [[5, 6, 7, 8], list(range(20, 50)), [300] * 9, [11, 400, 12, 401, 13, 402]]
NEW_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_rank_group_serves_like_one_process():
    model = tiny_model_dir(NAME)
    options = {"max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 16}
    single = LLM(str(model), dtype="float32", **options)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = [r.token_ids for r in single.generate(PROMPTS, greedy)]

    command = [MOEFLEET, "serve", "--model", str(model), "--port", "0", "--nproc-per-node", "2"]
    command += ["--master-port", str(_free_port()), "--max-model-len", "128", "--max-num-seqs", "4"]
    command += ["--max-num-batched-tokens", "16", "--log-level", "warning", "--print-examples"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        base_url = wait_for_banner_url(process, timeout=180)

        def complete(prompt: list[int]) -> list[int]:
            body = {"model": model.name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
            body |= {"ignore_eos": True, "return_token_ids": True}
            response = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # together: requests spread over both ranks
            assert list(pool.map(complete, PROMPTS)) == expected
        assert httpx.get(base_url + "/health", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0


def test_experts_must_divide_over_the_ranks(capsys):
    model = tiny_model_dir(NAME)
    experts = json.loads((model / "config.json").read_text())["num_experts"]
    assert experts % 3
    assert main(["serve", "--model", str(model), "--port", "0", "--nproc-per-node", "3"]) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert f"num_experts ({experts}) is not divisible by expert-parallel size (3)" in error
