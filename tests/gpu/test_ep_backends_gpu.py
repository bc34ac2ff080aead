"""On 2 NVIDIA GPUs: the symm and DeepEP (normal + low-latency) dispatchers against the dense formula on
skewed, empty, padded and maximal routings (tests/gpu/ep_gpu_worker.py, one torchrun per backend), symm inside
a CUDA graph without host syncs, and `moefleet serve --nproc-per-node 2 --moe-backend symm|deepep` giving the
greedy tokens of transformers (symm, float32) / of the a2a backend (deepep, bfloat16: DeepEP moves bf16 only).
Skipped without 2 GPUs (CI); DeepEP cases skipped where deep_ep is not importable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from moefleet.engine.distributed.deepep import deep_ep_available
from server.conftest import complete_token_ids, stop_process
from support.reference import free_port, moefleet_executable, transformers_greedy
from support.tiny_models import tiny_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs"),
    pytest.mark.timeout(600),
]
WORKER = Path(__file__).with_name("ep_gpu_worker.py")
NEW_TOKENS = 8
PROMPTS = [[5, 6, 7, 8], list(range(20, 70)), [300] * 9, [11, 400, 12, 401, 13, 402]]


@pytest.mark.parametrize(
    "backend", ["a2a", "symm", "nvlink", "nvlink_fp8", "deepep_normal", "deepep_ll", "deepep_ll_bf16"]
)
def test_dispatcher_round_trips(backend):
    if backend.startswith("deepep") and not deep_ep_available():
        pytest.skip("deep_ep is not installed (README: Installing DeepEP)")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), str(WORKER), backend]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "FAIL" not in result.stdout and result.stdout.count("PASS") >= 10


def _serve_tokens(
    model: Path, backend: str, dtype: str, prompts: list[list[int]] = PROMPTS, cuda_graphs: str = "auto"
) -> list[list[int]]:
    command = [
        moefleet_executable(),
        "serve",
        "--model",
        str(model),
        "--port",
        "0",
        "--device",
        "cuda",
        "--dtype",
        dtype,
    ]
    command += [
        "--print-examples",
        "--nproc-per-node",
        "2",
        "--moe-backend",
        backend,
        "--cuda-graphs",
        cuda_graphs,
    ]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "16"]
    log_dir = Path(os.environ.get("EP_SERVE_LOG_DIR") or tempfile.mkdtemp())
    log_path = log_dir / f"serve_{model.name}_{backend}_{dtype}_graphs-{cuda_graphs}.log"
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        url = _banner_url(process, log_path, timeout=180)

        def complete(prompt: list[int]) -> list[int]:
            return complete_token_ids(url, model.name, prompt, NEW_TOKENS, timeout=300)

        alone = [complete(p) for p in prompts[:1]]  # one request: the other rank idles (T = 0)
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(complete, prompts))
    finally:
        code = stop_process(process)
        log.close()
    assert code == 0, log_path.read_text()[-4000:]
    assert "moe backend: " + backend in log_path.read_text()  # the start-up line names the backend
    if cuda_graphs == "on":  # every rank captured the expert-parallel decode graphs
        assert re.search(r"CUDA graphs: on: .*expert-parallel", log_path.read_text()), log_path.read_text()[
            -4000:
        ]
    assert alone == together[:1]
    return together


def _banner_url(process: subprocess.Popen, log_path: Path, timeout: float) -> str:
    """Poll the server's log for the examples banner (the server listens by then); fail with its tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"is serving '[^']+' at (http://\S+)", log_path.read_text())
        if match:
            return match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"no banner (exit code {process.poll()}); log tail:\n{log_path.read_text()[-6000:]}")


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_symm_serve_equals_transformers(name):
    model = tiny_model_dir(name)
    assert _serve_tokens(model, "symm", "float32") == transformers_greedy(
        model, PROMPTS, NEW_TOKENS, ignore_eos=True
    )


def test_symm_serve_with_expert_parallel_cuda_graphs_equals_transformers():
    """`--cuda-graphs on` with symm: decode steps replay the group-agreed bucket on both ranks (a lone request:
    the idle rank replays padding; 5 requests: 3 + 2 sequences, both replay bucket 4). The gate for
    cuda_graph_runner.EP_GRAPHS_VERIFIED (auto)."""
    model = tiny_model_dir("qwen3_norm_topk")
    prompts = [*PROMPTS, [90, 91, 92]]
    got = _serve_tokens(model, "symm", "float32", prompts, cuda_graphs="on")
    assert got == transformers_greedy(model, prompts, NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_grouped"])
def test_nvlink_serve_equals_transformers(name):
    model = tiny_model_dir(name)
    assert _serve_tokens(model, "nvlink", "float32") == transformers_greedy(
        model, PROMPTS, NEW_TOKENS, ignore_eos=True
    )


def test_nvlink_serve_with_expert_parallel_cuda_graphs_equals_transformers():
    """nvlink with `--cuda-graphs on` (uneven 3 + 2 sequences, a lone request: the idle rank replays padding):
    greedy tokens equal transformers'. The gate for auto picking nvlink and EP graphs with it."""
    model = tiny_model_dir("qwen3_norm_topk")
    prompts = [*PROMPTS, [90, 91, 92]]
    got = _serve_tokens(model, "nvlink", "float32", prompts, cuda_graphs="on")
    assert got == transformers_greedy(model, prompts, NEW_TOKENS, ignore_eos=True)


@pytest.mark.skipif(not deep_ep_available(), reason="deep_ep is not installed (README: Installing DeepEP)")
def test_deepep_serve_equals_a2a_bf16():
    model = tiny_model_dir("qwen3_norm_topk")
    assert _serve_tokens(model, "deepep", "bfloat16") == _serve_tokens(model, "a2a", "bfloat16")


@pytest.mark.skipif(not deep_ep_available(), reason="deep_ep is not installed (README: Installing DeepEP)")
@pytest.mark.parametrize("cuda_graphs", ["auto", "on"])
def test_deepep_low_latency_serve_equals_a2a_bf16(tmp_path, cuda_graphs):
    """DeepEP inside `moefleet serve` at a width its low-latency kernels support (hidden 2048; the tiny models'
    64 have none): prefill steps run the normal kernels, decode steps the low-latency ones with bf16 rows (a
    bf16 model), eagerly (auto: EP graphs unverified) and replayed from CUDA graphs (on); greedy tokens equal
    the a2a backend's."""
    from moefleet.engine.tiny_model import make_tiny_model

    model = make_tiny_model("qwen3_moe", tmp_path / "qwen3_moe_ll", seed=5, hidden_size=2048)
    prompts = [*PROMPTS, [90, 91, 92]]
    got = _serve_tokens(model, "deepep", "bfloat16", prompts, cuda_graphs=cuda_graphs)
    assert got == _serve_tokens(model, "a2a", "bfloat16", prompts)
