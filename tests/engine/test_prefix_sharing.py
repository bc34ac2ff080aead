"""n > 1 in the real engine: choices that share their prompt's KV blocks (prefix_share_key) produce exactly
the tokens they produce alone (the shared K/V is right), compute fewer prompt tokens, and survive preemption."""

from __future__ import annotations

from dataclasses import replace

import pytest
from moefleet.engine import LLM, SamplingParams
from support.tiny_models import one_torch_thread, tiny_model_dir

pytestmark = pytest.mark.timeout(300)

NAME = "deepseek_grouped"
PROMPT = list(range(50, 87))  # 37 tokens: 9 full blocks of 4 shared, 1 token computed per extra choice


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


def _llm(**config) -> LLM:
    return LLM(str(tiny_model_dir(NAME)), dtype="float32", max_model_len=64, block_size=4, **config)


@pytest.mark.parametrize("num_kv_blocks", [None, 16])
def test_shared_prompt_blocks_give_the_same_tokens_as_unshared_runs(num_kv_blocks):
    extra = (
        {"num_kv_blocks": num_kv_blocks, "max_num_batched_tokens": 16, "max_num_seqs": 4}
        if num_kv_blocks
        else {}
    )
    base = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    choices = [replace(base, seed=100 + i, prefix_share_key="req") for i in range(4)]
    shared_llm = _llm(**extra)
    shared = shared_llm.generate([PROMPT] * 4, choices)
    alone = [_llm().generate([PROMPT], replace(p, prefix_share_key=None))[0] for p in choices]
    assert [r.token_ids for r in shared] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in shared}) > 1
    engine = shared_llm.engine
    if num_kv_blocks is None:
        # The first choice computes the prompt; each other one only its last, unshared token.
        assert engine.prompt_tokens_total == len(PROMPT) + 3 * 1
    else:
        assert engine.scheduler.num_preemptions_total > 0
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks
