"""Logprobs parity: sampled-token and prompt logprobs (with top-k) equal transformers' log_softmax of the
same checkpoint in float32 (1e-5), under chunked prefill and preemption, and only for requests that ask."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import LLM, SamplingParams
from support.tiny_models import one_torch_thread, tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(300)

NAME = "qwen3_norm_topk"
PROMPTS = [list(range(40, 63)), list(range(100, 105)), [7], list(range(300, 330))]
NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def hf_logprobs():
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(NAME), dtype=torch.float32).eval()

    def run(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([token_ids])).logits[0].float()
        return logits.log_softmax(dim=-1)  # [L, V]: row p = distribution of token p + 1

    return run


@pytest.mark.parametrize("budget,num_kv_blocks", [(512, None), (8, 12), (64, 10)])
def test_logprobs_match_transformers(hf_logprobs, budget, num_kv_blocks):
    """budget 8: prompts prefilled in 8-token chunks; 10 blocks of 4 and budget 64: a sequence is preempted
    (and recomputes its prompt: its prompt logprobs are not recorded twice)."""
    extra = {"num_kv_blocks": num_kv_blocks} if num_kv_blocks else {}
    llm = LLM(
        str(tiny_model_dir(NAME)),
        dtype="float32",
        max_model_len=64,
        block_size=4,
        max_num_batched_tokens=budget,
        max_num_seqs=4,
        **extra,
    )
    asked = SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    plain = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    params = [asked, plain, asked, asked]
    engine = llm.engine
    seen: dict[str, list] = {}
    prompt_seen: dict[str, list] = {}
    for i, (prompt, p) in enumerate(zip(PROMPTS, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.logprobs is not None:
                seen.setdefault(out.request_id, []).extend(out.logprobs)
            if out.prompt_logprobs is not None:
                assert out.request_id not in prompt_seen, "prompt logprobs are sent once"
                prompt_seen[out.request_id] = out.prompt_logprobs
    assert "r1" not in seen and "r1" not in prompt_seen  # not asked: nothing computed or sent
    for i in (0, 2, 3):
        rid, prompt = f"r{i}", PROMPTS[i]
        outputs = [entry.token_id for entry in seen[rid]]
        assert len(outputs) == NEW_TOKENS
        ref = hf_logprobs(prompt + outputs)
        for j, entry in enumerate(seen[rid]):
            row = ref[len(prompt) - 1 + j]
            assert entry.token_id == int(row.argmax())  # greedy
            assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-5)
            top_v, top_i = row.topk(3)
            assert [t for t, _ in entry.top] == top_i.tolist()
            assert [v for _, v in entry.top] == pytest.approx(top_v.tolist(), abs=1e-5)
        prompt_lp = prompt_seen[rid]
        assert len(prompt_lp) == len(prompt) and prompt_lp[0] is None
        for p in range(1, len(prompt)):
            entry, row = prompt_lp[p], ref[p - 1]
            assert entry.token_id == prompt[p]
            assert entry.logprob == pytest.approx(float(row[prompt[p]]), abs=1e-5)
            assert [t for t, _ in entry.top] == row.topk(2).indices.tolist()
    if budget == 64:
        assert engine.scheduler.num_preemptions_total > 0


def test_logprobs_are_raw_before_temperature(hf_logprobs):
    """Sampled with temperature 0.3 and top_k 2: logprobs are still the unscaled model distribution."""
    llm = LLM(str(tiny_model_dir(NAME)), dtype="float32", max_model_len=64, block_size=4)
    params = SamplingParams(temperature=0.3, top_k=2, seed=1, max_tokens=4, ignore_eos=True, logprobs=5)
    prompt = PROMPTS[0]
    engine = llm.engine
    engine.add_request("s", prompt, params)
    entries = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            entries.extend(out.logprobs or [])
    ref = hf_logprobs(prompt + [e.token_id for e in entries])
    for j, entry in enumerate(entries):
        row = ref[len(prompt) - 1 + j]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-5)
        assert len(entry.top) == 5
        assert entry.token_id in row.topk(2).indices.tolist()


def test_offline_generate_returns_logprobs(hf_logprobs):
    """`LLM.generate` carries the logprobs of the requests that ask (one per new token), None for the others."""
    llm = LLM(str(tiny_model_dir(NAME)), dtype="float32", max_model_len=64, block_size=4)
    asked = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    plain = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with_lp, without = llm.generate([PROMPTS[0], PROMPTS[1]], [asked, plain])
    assert without.logprobs is None
    assert with_lp.logprobs is not None and [e.token_id for e in with_lp.logprobs] == with_lp.token_ids
    ref = hf_logprobs(PROMPTS[0] + with_lp.token_ids)
    for j, entry in enumerate(with_lp.logprobs):
        row = ref[len(PROMPTS[0]) - 1 + j]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-5)
        assert [t for t, _ in entry.top] == row.topk(2).indices.tolist()
