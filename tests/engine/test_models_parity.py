"""Acceptance: moefleet models equal transformers (float32) on every named tiny config.

Logits of a whole-prompt forward match to ~1e-5; greedy generation through the paged KV cache (prefill +
decode, chunked prefill, several sequences batched in one forward) equals `generate(do_sample=False)`.
"""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.loader import load_model
from support.tiny_models import TINY_CONFIGS, PagedDriver, one_torch_thread, tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(120)

NEW_TOKENS = 16
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Hello",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def reference():
    """name -> (model dir, transformers model, token id prompts); loaded once per name."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = tiny_model_dir(name)
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tok = transformers.AutoTokenizer.from_pretrained(path)
            prompts = [tok(p)["input_ids"] for p in PROMPTS]
            cache[name] = (path, hf, prompts)
        return cache[name]

    return get


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_prefill_logits_match_transformers(name, reference):
    path, hf, prompts = reference(name)
    model = load_model(path, "cpu", torch.float32)
    prompt = prompts[0]
    logits = PagedDriver(model).step([(0, prompt)], all_logits=True)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_generation_matches_transformers(name, reference):
    path, hf, prompts = reference(name)
    model = load_model(path, "cpu", torch.float32)
    expected = {i: hf_greedy(hf, p, NEW_TOKENS) for i, p in enumerate(prompts)}
    assert len(set(expected[0])) > 1, "reference output is degenerate: the tiny model's init is too weak"

    # One sequence at a time: whole-prompt prefill, then decode.
    for i, prompt in enumerate(prompts):
        got = PagedDriver(model).generate({0: prompt}, NEW_TOKENS)[0]
        assert got == expected[i], f"prompt {i}: single-sequence generation differs"

    # Chunked prefill (3 chunks attend to earlier chunks in the cache), all sequences batched.
    got = PagedDriver(model).generate(dict(enumerate(prompts)), NEW_TOKENS, prefill_chunks=3)
    assert got == expected, "chunked prefill + batched decode differs"

    # Mixed step: one sequence decodes while another prefills, in one forward.
    driver = PagedDriver(model)
    first = driver.step([(0, prompts[0])])
    tokens0 = [int(first[0].argmax())]
    mixed = driver.step([(0, tokens0[-1:]), (1, prompts[1])])
    tokens0.append(int(mixed[0].argmax()))
    tokens1 = [int(mixed[1].argmax())]
    assert tokens0 == expected[0][:2]
    assert tokens1 == expected[1][:1]


@pytest.mark.parametrize(
    "name", ["qwen3_norm_topk", "deepseek_grouped", "glm4_grouped", "gpt_oss_sliding", "llama4_chunked"]
)
def test_idle_step_with_zero_tokens(name):
    """Idle data-parallel ranks run the model on T = 0 tokens (so MoE collectives line up)."""
    from moefleet.engine.forward_batch import ForwardBatch, ForwardMode

    model = load_model(tiny_model_dir(name))
    PagedDriver(model)  # allocate caches as in serving
    batch = ForwardBatch.build(
        input_ids=[], positions=[], query_lens=[], seq_lens=[], block_tables=[], block_size=4, device="cpu"
    )
    assert batch.mode is ForwardMode.IDLE
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.positions, batch)
    assert hidden.shape == (0, model.config.hidden_size)
    assert model.compute_logits(hidden).shape == (0, model.config.vocab_size)
