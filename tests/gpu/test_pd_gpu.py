"""On 2 NVIDIA GPUs: prefill/decode disaggregation with the `p2p` KV transfer over NCCL, the prefill server on
GPU 0 and the decode server on GPU 1 (`CUDA_VISIBLE_DEVICES`), behind the gateway.

Oracles: float32 greedy tokens equal transformers (CPU) and a mixed-role server on GPU 0; bfloat16 greedy
tokens equal the mixed-role server's (same kernels, same batch shapes: one request at a time). KV usage is back
to 0 on both servers after each run. Skipped without 2 GPUs (CI)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
import torch
from disaggregation.pd_fleet import PROMPTS, completion_ids, kv_idle, pd_config, stream_ids
from disaggregation.pd_fleet import body as request_body
from faults.conftest import wait_until
from gateway.conftest import serve_gateway
from server.conftest import stop_process, wait_for_banner_url
from support.reference import moefleet_executable, transformers_greedy
from support.tiny_models import tiny_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs"),
    pytest.mark.timeout(600),
]
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 8


@contextmanager
def _server(name: str, gpu: int, dtype: str, role: str) -> Iterator[str]:
    command = [
        moefleet_executable(),
        "serve",
        "--model",
        str(tiny_model_dir(name)),
        "--port",
        "0",
        "--print-examples",
    ]
    command += ["--device", "cuda", "--dtype", dtype, "--role", role]
    command += ["--kv-transfer", "p2p"] if role != "mixed" else []
    command += ["--served-model-name", name, "--max-model-len", "256", "--max-num-seqs", "8"]
    command += ["--log-level", "warning"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        yield wait_for_banner_url(process, timeout=300)
    finally:
        stop_process(process)


def _outputs(url: str, name: str) -> list[list[int]]:
    """Each prompt alone, not streamed and streamed (both must agree), in order."""
    out = []
    for prompt in PROMPTS:
        ids = completion_ids(url, request_body(name, prompt))
        assert stream_ids(url, request_body(name, prompt, stream=True)) == ids
        out.append(ids)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_pd_prefill_gpu0_decode_gpu1_over_nccl_matches_mixed(name, dtype):
    with ExitStack() as stack:
        prefill = stack.enter_context(_server(name, 0, dtype, "prefill"))
        decode = stack.enter_context(_server(name, 1, dtype, "decode"))
        for url in (prefill, decode):
            boot = httpx.get(url + "/v1/pd/bootstrap", timeout=10).json()
            assert boot["kv_transfer_backend"] == "p2p", boot
        gateway, _ = stack.enter_context(serve_gateway(pd_config(prefill, decode)))
        through_pd = _outputs(gateway, name)
        wait_until(lambda: kv_idle(prefill, decode), timeout=15)
    with _server(name, 0, dtype, "mixed") as mixed:
        alone = _outputs(mixed, name)
    assert through_pd == alone
    if dtype == "float32":
        expected = transformers_greedy(tiny_model_dir(name), PROMPTS, NEW_TOKENS, ignore_eos=True)
        assert through_pd == expected
