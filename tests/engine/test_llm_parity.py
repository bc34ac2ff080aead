"""Acceptance: LLM.generate (continuous batching, chunked prefill, preemption) equals transformers greedy
decoding token for token, for every named tiny config, in float32 on CPU.

transformers runs one prompt at a time; moefleet runs all prompts together, (a) with a small token budget
so long prompts are prefilled in chunks while others decode, and (b) with a KV pool so small that running
sequences are preempted and recomputed.
"""

from __future__ import annotations

import pytest
from moefleet.engine import LLM, SamplingParams
from support.reference import transformers_greedy
from support.tiny_models import TINY_CONFIGS, one_torch_thread, tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(300)

NEW_TOKENS = 12
TEXTS = [
    "Hello",
    "What is the capital of France?",
    "Once upon a time there was a little town by the sea, where the people woke up early to fish and to "
    "bake bread. The children went to school, and the old men sat in the sun",
    "The knight rode through the forest for many days. He was tired and hungry, but he did not give up. "
    "At last he found the cave of the dragon, and the dragon said: why have you come here, little knight? "
    "Machines that serve language models must be fast, fair and reliable.",
]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Tiny matmuls on a shared 2-core machine: extra intra-op threads only contend (10x slower).
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def reference():
    """name -> (model dir, prompts as token ids, transformers greedy continuation per prompt)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = tiny_model_dir(name)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            eos = transformers.GenerationConfig.from_pretrained(path).eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
            expected = []
            for tokens in transformers_greedy(path, prompts, NEW_TOKENS):
                stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
                expected.append(tokens if stop is None else tokens[: stop + 1])
            cache[name] = (path, prompts, expected)
        return cache[name]

    return get


def generate(path, prompts, **config):
    """Greedy LLM.generate; also returns every scheduled batch as [(start, num_new_tokens, samples)]."""
    llm = LLM(str(path), dtype="float32", max_model_len=256, **config)
    batches = []
    schedule = llm.engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        batches.append([(s.start, s.num_new_tokens, s.samples) for s in out.scheduled])
        return out

    llm.engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    return llm, [r.token_ids for r in results], batches


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_chunked_prefill_continuous_batching_matches_transformers(name, reference):
    path, prompts, expected = reference(name)
    assert len({len(p) for p in prompts}) == len(prompts) and max(len(p) for p in prompts) > 24
    llm, got, batches = generate(path, prompts, max_num_batched_tokens=12, max_num_seqs=4)
    assert got == expected
    # The run really chunked prompts and mixed prompt chunks with decodes in one forward.
    assert any(start > 0 and n > 1 for batch in batches for start, n, _ in batch)
    assert any(any(n == 1 for _, n, _ in b) and any(n > 1 for _, n, _ in b) for b in batches)
    stats = llm.engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == stats["num_waiting"] == 0


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_preemption_does_not_change_outputs(name, reference):
    path, prompts, expected = reference(name)
    # 4-token blocks; the longest request just fits, all four together do not.
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    num_blocks = -(-longest // 4) + 2
    llm, got, _ = generate(
        path, prompts, max_num_batched_tokens=32, max_num_seqs=4, block_size=4, num_kv_blocks=num_blocks
    )
    assert llm.engine.stats()["num_preemptions_total"] > 0
    assert got == expected
