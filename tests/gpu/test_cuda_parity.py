"""On an NVIDIA GPU: float32 CUDA greedy outputs equal transformers (CPU, float32) token for token, and
bfloat16 stays within the stated tolerance of float32 (tests/support/bf16_tolerance.py, also checked on CPU
in tests/engine/test_bf16_tolerance.py). Skipped where no GPU is visible (CI)."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import LLM, SamplingParams
from support.bf16_tolerance import check_bf16_as_faithful_as_transformers, check_bf16_tolerance
from support.reference import transformers_greedy
from support.tiny_models import TINY_CONFIGS, tiny_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.timeout(600),
]
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 16
TEXTS = [
    "Hello",
    "What is the capital of France?",
    "Once upon a time there was a little town by the sea, where the people woke up early to fish and to "
    "bake bread. The children went to school, and the old men sat in the sun",
]


def _reference(path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    return prompts, transformers_greedy(path, prompts, NEW_TOKENS)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_cuda_float32_greedy_equals_transformers(name):
    path = tiny_model_dir(name)
    prompts, expected = _reference(path)
    llm = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = llm.generate(prompts, params)
    for prompt, result, want in zip(prompts, results, expected, strict=True):
        got = result.token_ids[: len(want)]
        assert got == want, f"{name}: prompt of {len(prompt)} tokens diverged: {got} != {want}"


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_cuda_bfloat16_within_tolerance_of_float32(name):
    check_bf16_tolerance(name, "cuda")


@pytest.mark.parametrize(
    "name", [n for n in sorted(TINY_CONFIGS) if n.startswith(("glm4", "gpt_oss", "llama4"))]
)
def test_cuda_bfloat16_as_faithful_as_transformers(name):
    """On CUDA too, bf16 agrees with float32 about as often as transformers' own bf16 does on CUDA."""
    check_bf16_as_faithful_as_transformers(name, "cuda")
