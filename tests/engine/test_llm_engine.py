"""LLMEngine / LLM on a real tiny model: streaming outputs, stop strings, abort, seeds, validation, idle steps."""

from __future__ import annotations

import pytest
from moefleet.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from moefleet.engine.scheduler import SchedulerOutput
from support.tiny_models import one_torch_thread, tiny_model_dir

pytestmark = pytest.mark.timeout(120)

PROMPT_TEXTS = ["The quick brown fox", "Hello", "Once upon a time there was a little town by the sea"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():  # tiny matmuls on a shared 2-core machine: threads only contend
        yield


@pytest.fixture(scope="module")
def model_dir():
    return str(tiny_model_dir("qwen3_norm_topk"))


@pytest.fixture
def engine(model_dir):
    return LLMEngine(
        EngineConfig(model=model_dir, max_model_len=128, max_num_batched_tokens=16, max_num_seqs=4)
    )


def run_to_completion(engine):
    outputs = []
    for _ in range(500):
        if not engine.has_unfinished_requests():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("engine did not finish")


def test_streaming_outputs_add_up(engine):
    tok = engine.tokenizer
    for i, text in enumerate(PROMPT_TEXTS):
        engine.add_request(
            f"r{i}", tok.encode(text), SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
        )
    assert engine.stats()["num_waiting"] == 3
    outputs = run_to_completion(engine)
    for i, text in enumerate(PROMPT_TEXTS):
        mine = [o for o in outputs if o.request_id == f"r{i}"]
        tokens = [t for o in mine for t in o.new_token_ids]
        assert len(tokens) == 7 and [o.num_output_tokens for o in mine] == list(range(1, 8))
        assert "".join(o.text_delta for o in mine) == tok.decode(tokens)
        assert [o.finished for o in mine] == [False] * 6 + [True]
        assert mine[-1].finish_reason == "length" and mine[-1].num_prompt_tokens == len(tok.encode(text))
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["generation_tokens_total"] == 21
    assert stats["prompt_tokens_total"] == sum(len(tok.encode(t)) for t in PROMPT_TEXTS)
    assert set(stats) >= {"num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total", "kv_usage"}


def test_stop_string_truncates_text(model_dir):
    llm = LLM(model_dir, max_model_len=128)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate([PROMPT_TEXTS[0]], greedy)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = full.text.index(stop)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    result = llm.generate([PROMPT_TEXTS[0]], params)[0]
    assert (result.finish_reason, result.stop_reason) == ("stop", stop)
    assert result.text == full.text[:cut]
    assert result.token_ids == full.token_ids[: len(result.token_ids)] and len(result.token_ids) < 24


def test_stop_token_ids(model_dir):
    llm = LLM(model_dir, max_model_len=128)
    full = llm.generate([PROMPT_TEXTS[1]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    stop_id = full.token_ids[4]
    first = full.token_ids.index(stop_id)
    result = llm.generate(
        [PROMPT_TEXTS[1]],
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id]),
    )[0]
    assert result.token_ids == full.token_ids[: first + 1]
    assert (result.finish_reason, result.stop_reason) == ("stop", stop_id)


def test_abort_frees_blocks_and_reports(engine):
    tok = engine.tokenizer
    engine.add_request("a", tok.encode(PROMPT_TEXTS[2]), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", tok.encode(PROMPT_TEXTS[0]), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    used = engine.stats()["kv_blocks_used"]
    assert used > 0
    assert engine.abort_request("a") is True
    assert engine.stats()["kv_blocks_used"] < used
    assert engine.abort_request("a") is False and engine.abort_request("nope") is False
    with pytest.raises(ValueError, match="already in use"):  # its abort notice is not delivered yet
        engine.add_request("a", [5, 6], SamplingParams())
    outputs = run_to_completion(engine)
    aborted = [o for o in outputs if o.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert [o.finish_reason for o in outputs if o.request_id == "b"][-1] == "length"
    assert engine.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_is_reproducible_in_any_batch(model_dir):
    llm = LLM(model_dir, max_model_len=128)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT_TEXTS[0]], params)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 2
    batched = llm.generate(
        [PROMPT_TEXTS[1], PROMPT_TEXTS[0], PROMPT_TEXTS[2]], [others[0], params, others[1]]
    )
    assert batched[1].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=99, ignore_eos=True)
    assert llm.generate([PROMPT_TEXTS[0]], other_seed)[0].token_ids != alone


def test_generate_accepts_text_and_ids_in_order(model_dir):
    llm = LLM(model_dir, max_model_len=128)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    by_text = llm.generate(PROMPT_TEXTS, greedy)
    by_ids = llm.generate([llm.tokenizer.encode(t) for t in reversed(PROMPT_TEXTS)], greedy)
    assert [r.token_ids for r in by_text] == [r.token_ids for r in reversed(by_ids)]
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert len(llm.generate([chat], greedy)[0].token_ids) == 5
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(PROMPT_TEXTS, [greedy])


def test_add_request_rejects_bad_requests(engine):
    with pytest.raises(ValueError, match="lower max_tokens to at most 28"):
        engine.add_request("a", list(range(100)), SamplingParams(max_tokens=29))
    with pytest.raises(ValueError, match="longer than max_model_len"):
        engine.add_request("a", [1] * 129, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("a", [1, 10**6], SamplingParams())
    engine.add_request("a", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5, 6], SamplingParams())


def test_config_and_params_validation(model_dir, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        EngineConfig(model=str(tmp_path))
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) must be in \[1, 1024\]"):
        EngineConfig(model=model_dir, max_model_len=4096)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model=model_dir, dtype="int8")
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs"):
        EngineConfig(model=model_dir, max_num_batched_tokens=8, max_num_seqs=16)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model=model_dir, block_size=0)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model=model_dir, attention_backend="flash")
    with pytest.raises(ValueError, match=r"block_size \(8\) must be a power of two >= 16"):
        EngineConfig(model=model_dir, attention_backend="triton", block_size=8)
    with pytest.raises(ValueError, match="cuda_graphs"):
        EngineConfig(model=model_dir, cuda_graphs="always")
    config = EngineConfig(model=model_dir)
    assert config.dtype == "float32" and config.max_model_len == 1024
    with pytest.raises(ValueError, match="fewer than one max_model_len"):
        LLMEngine(EngineConfig(model=model_dir, kv_cache_bytes=1000))
    for bad in (
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": 0},
        {"max_tokens": 0},
        {"min_tokens": 5, "max_tokens": 2},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_idle_step_and_step_agreement(model_dir):
    """Expert-parallel ranks: forward even with nothing scheduled, in the mode the group agreed on."""
    seen = []

    def agree(batch: SchedulerOutput) -> tuple[bool, bool]:
        return True, True  # always run, always in prefill mode (as if another rank prefills)

    engine = LLMEngine(EngineConfig(model=model_dir, max_model_len=128), step_agreement=agree)
    model = engine.model_runner.model
    hook = model.register_forward_hook(
        lambda m, args, out: seen.append((args[0].numel(), args[2].is_prefill))
    )
    assert engine.step() == [] and seen == [(0, True)]  # idle forward, T = 0
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = engine.tokenizer.encode(PROMPT_TEXTS[0])
    engine.add_request("x", ids, greedy)
    tokens = [t for o in run_to_completion(engine) for t in o.new_token_ids]
    hook.remove()
    assert all(is_prefill for _, is_prefill in seen) and len(seen) == 1 + 6
    # Forcing prefill mode on decode steps changes nothing.
    reference = LLM(model_dir, max_model_len=128).generate([ids], greedy)[0].token_ids
    assert tokens == reference


def test_warmup_runs_the_largest_step_without_touching_the_cache(model_dir):
    engine = LLMEngine(
        EngineConfig(model=model_dir, max_model_len=64, max_num_batched_tokens=150, max_num_seqs=8)
    )
    runner = engine.model_runner
    caches = [layer.kv_cache for layer in runner.attention_layers]
    seen = []
    hook = runner.model.register_forward_hook(lambda m, args, out: seen.append(list(args[2].query_lens)))
    runner.warmup()
    hook.remove()
    assert seen == [[64, 64, 22]]
    assert all(layer.kv_cache is cache for layer, cache in zip(runner.attention_layers, caches, strict=True))
    assert all(cache.abs().sum() == 0 for cache in caches)  # nothing was written into the KV cache


def test_min_tokens_bans_stop_tokens_until_reached(model_dir):
    llm = LLM(model_dir, max_model_len=128)
    full = llm.generate([PROMPT_TEXTS[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    stop_id = full.token_ids[0]  # greedy's first choice
    params = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=3
    )
    result = llm.generate([PROMPT_TEXTS[0]], params)[0]
    assert stop_id not in result.token_ids[:3]  # masked, so greedy picked something else
    assert result.token_ids[0] != full.token_ids[0]
    if stop_id in result.token_ids:
        assert result.token_ids[-1] == stop_id and result.finish_reason == "stop"


def test_kv_page_size_defaults_to_64_for_mla_on_cuda():
    """The MLA decode kernel reads a whole 64-token page as one tile (docs/benchmarks.md); other attention and
    CPU runs keep 16-token pages; an explicit size (config or `moefleet serve --block-size`) wins."""
    from moefleet.engine.cli import build_parser
    from moefleet.engine.entrypoints.serve_command import engine_config

    mla, gqa = str(tiny_model_dir("deepseek_grouped")), str(tiny_model_dir("qwen3_norm_topk"))
    assert EngineConfig(model=mla, device="cuda").block_size == 64
    assert EngineConfig(model=mla).block_size == 16  # cpu
    assert EngineConfig(model=gqa, device="cuda").block_size == 16
    assert EngineConfig(model=mla, device="cuda", block_size=32).block_size == 32
    assert EngineConfig(model=mla, device="cuda").max_blocks_per_seq == -(-1024 // 64)
    args = build_parser().parse_args(["serve", "--model", mla, "--block-size", "128"])
    assert engine_config(args).block_size == 128
    assert engine_config(build_parser().parse_args(["serve", "--model", mla])).block_size == 16
