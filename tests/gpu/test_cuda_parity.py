"""On an NVIDIA GPU: float32 CUDA greedy outputs equal transformers (CPU, float32) token for token, and
bfloat16 stays within a stated tolerance of float32. Skipped where no GPU is visible (CI).

Tolerance for bfloat16 (prompt logits of every position, moefleet bf16 vs moefleet fp32 on the same GPU):
relative L2 error <= 6e-2 and the top-1 token agrees on >= 90% of positions. bf16 keeps 8 mantissa bits, so
per-element logit error ~1e-2 relative is expected; tiny random models have near-tied logits, so a few
top-1 flips are expected too. First measured on H200 (2026-11-28): relative L2 2.5e-2 to 4.6e-2, top-1
agreement 94% to 98% across the tiny configs.
"""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import LLM, SamplingParams
from moefleet.engine.loader import load_model
from support.tiny_models import TINY_CONFIGS, PagedDriver, tiny_model_dir

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
BF16_REL_L2 = 6e-2
BF16_TOP1_AGREEMENT = 0.90


def _reference(path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
            )
        expected.append(out[0, len(prompt) :].tolist())
    return prompts, expected


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
    path = tiny_model_dir(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompt = tokenizer(TEXTS[2])["input_ids"]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, "cuda", dtype)
        driver = PagedDriver(model, dtype=dtype, device="cuda")
        with torch.inference_mode():
            logits[dtype] = driver.step([(0, prompt)], all_logits=True).float()
    ref, low = logits[torch.float32], logits[torch.bfloat16]
    rel = (torch.linalg.vector_norm(low - ref) / torch.linalg.vector_norm(ref)).item()
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{name}: bf16 vs fp32 relative L2 {rel:.2e}, top-1 agreement {agree:.1%}")
    assert rel <= BF16_REL_L2, f"{name}: bf16 relative L2 error {rel:.3e} > {BF16_REL_L2}"
    assert agree >= BF16_TOP1_AGREEMENT, f"{name}: bf16 top-1 agreement {agree:.1%}"
