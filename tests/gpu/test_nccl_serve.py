"""On 2-4 NVIDIA GPUs: `moefleet serve --device cuda --nproc-per-node N` (DP attention + EP MoE over NCCL)
answers greedy completions over HTTP that equal transformers (CPU, float32) token for token, for every
family (one tiny config each), with concurrent requests, single requests that leave ranks idle, and prompts
long enough to need several prefill chunks. Skipped without at least 2 GPUs (CI)."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from server.conftest import complete_token_ids, stop_process, wait_for_banner_url
from support.reference import free_port, moefleet_executable, transformers_greedy
from support.tiny_models import tiny_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 NVIDIA GPUs"),
    pytest.mark.timeout(600),
]
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 10
PROMPTS = [[5, 6, 7, 8], list(range(20, 70)), [300] * 9, [11, 400, 12, 401, 13, 402], list(range(100, 140))]


@pytest.mark.parametrize(
    "name", ["qwen3_norm_topk", "deepseek_grouped", "glm4_grouped", "gpt_oss_sliding", "llama4_chunked"]
)
def test_nccl_group_serves_like_transformers(name):
    nproc = min(4, torch.cuda.device_count())
    model = tiny_model_dir(name)
    expected = transformers_greedy(model, PROMPTS, NEW_TOKENS, ignore_eos=True)  # as complete_token_ids
    command = [moefleet_executable(), "serve", "--model", str(model), "--port", "0", "--print-examples"]
    command += ["--device", "cuda", "--dtype", "float32", "--nproc-per-node", str(nproc)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "16"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
    )
    try:
        url = wait_for_banner_url(process, timeout=300)

        def complete(prompt: list[int]) -> list[int]:
            return complete_token_ids(url, model.name, prompt, NEW_TOKENS, timeout=300)

        # One at a time: all but one rank idle each step.
        assert [complete(p) for p in PROMPTS[:2]] == expected[:2]
        # Together: requests spread over the ranks; 50-token prompts take several 16-token chunks.
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(complete, PROMPTS)) == expected
    finally:
        code = stop_process(process)
    assert code == 0
