"""On an NVIDIA GPU: decode steps replayed from CUDA graphs equal the eager step, and whole-engine greedy
generation with graphs on equals transformers (float32) / stays within the bf16 tolerance.
Skipped where no GPU is visible (CI); the pure parts are tests/engine/test_cuda_graph_runner.py."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import LLM, SamplingParams
from moefleet.engine.loader import load_model
from support.bf16_tolerance import MEDIAN_REL_L2, TOP1_AGREEMENT
from support.reference import transformers_greedy
from support.tiny_models import PagedDriver, tiny_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.timeout(600),
]
transformers = pytest.importorskip("transformers")
NAMES = ["qwen3_norm_topk", "deepseek_grouped"]


def _graph_runner(model, backend, max_batch_size=8, max_blocks=8):
    from moefleet.engine.cuda_graph_runner import CudaGraphRunner

    runner = CudaGraphRunner(
        model, backend, max_batch_size=max_batch_size, max_blocks_per_seq=max_blocks, block_size=16,
        device=torch.device("cuda"),
    )  # fmt: skip
    runner.capture()
    return runner


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_replay_equals_eager(name, dtype):
    """Three decode steps of 3 and then 5 sequences (buckets 4 and 8): replayed logits equal eager ones."""
    from moefleet.engine.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend()
    model = load_model(tiny_model_dir(name), "cuda", dtype)
    driver = PagedDriver(
        model, num_blocks=64, block_size=16, dtype=dtype, device="cuda", attn_backend=backend
    )
    runner = _graph_runner(model, backend)
    prompts = {s: list(range(3 + s, 20 + 7 * s)) for s in range(5)}
    with torch.inference_mode():
        driver.step([(s, p) for s, p in prompts.items() if s < 3])
        last = {s: 1 for s in range(3)}
        for step in range(3):
            if step == 1:
                driver.step([(s, prompts[s]) for s in (3, 4)])
                last.update({3: 1, 4: 1})
            chunks = [(s, [last[s]]) for s in sorted(last)]
            batch = driver.batch(chunks)
            assert runner.can_run(batch)
            eager = runner._step(batch)
            replayed = runner.replay(batch).clone()
            if dtype == torch.float32:
                torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
            else:
                rel = torch.linalg.vector_norm(replayed - eager, dim=-1) / torch.linalg.vector_norm(
                    eager, dim=-1
                )
                assert rel.median().item() <= MEDIAN_REL_L2
                agree = (replayed.argmax(-1) == eager.argmax(-1)).float().mean().item()
                assert agree >= TOP1_AGREEMENT
            last = {s: int(t) for s, t in zip(sorted(last), replayed.argmax(-1).tolist(), strict=True)}


TEXTS = ["Hello", "What is the capital of France?", "Once upon a time there was a little town by the sea"]


def _generate(path, dtype, cuda_graphs, logprobs=None):
    llm = LLM(
        str(path), device="cuda", dtype=dtype, max_num_seqs=8, max_num_batched_tokens=64,
        attention_backend="triton", cuda_graphs=cuda_graphs,
    )  # fmt: skip
    runner = llm.engine.model_runner
    replays = []
    if runner.graph_runner is not None:
        original = runner.graph_runner.replay
        runner.graph_runner.replay = lambda batch, *group: (
            replays.append(batch.num_seqs) or original(batch, *group)
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=logprobs)
    outputs = llm.generate(prompts, params)
    if logprobs is not None:
        return prompts, [(r.token_ids, r.logprobs) for r in outputs], runner, replays
    return prompts, [r.token_ids for r in outputs], runner, replays


@pytest.mark.parametrize("name", NAMES)
def test_float32_greedy_with_graphs_equals_transformers(name):
    path = tiny_model_dir(name)
    prompts, got, runner, replays = _generate(path, "float32", "auto")
    assert runner.graph_runner is not None, "CUDA graphs were not captured (see the 'CUDA graphs:' line)"
    assert replays, "no decode step was replayed from a graph"
    assert got == transformers_greedy(path, prompts, 12)


# bf16 moves a tiny random model's logits by ~0.2 (tests/support/bf16_tolerance.py): two greedy runs may part
# where the top two tokens are closer than that, and after that point they continue different texts.
NEAR_TIE_NATS = 0.3


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_greedy_with_graphs_matches_eager(name):
    """bf16 with graphs vs bf16 eager: the same kernels on the same cache. Each sequence agrees token for token
    up to its first difference (if any); there, both tokens are eager's top two within NEAR_TIE_NATS (a
    rounding-order tie, not a wrong graph), and every agreeing token has the same logprob within that margin.
    Comparing whole sequences token for token was brittle: one near-tie early makes the rest differ."""
    path = tiny_model_dir(name)
    _, with_graphs, runner, replays = _generate(path, "bfloat16", "auto", logprobs=2)
    assert runner.graph_runner is not None and replays
    _, eager, _, _ = _generate(path, "bfloat16", "off", logprobs=2)
    agreed = 0
    for (g_ids, g_lps), (e_ids, e_lps) in zip(with_graphs, eager, strict=True):
        assert g_ids[0] == e_ids[0], "the prompt step is eager in both runs: first tokens must agree"
        for k, (g, e) in enumerate(zip(g_ids, e_ids, strict=True)):
            if g != e:
                top = dict(e_lps[k].top)
                assert g in top, f"position {k}: graph token {g} is not in eager's top 2 {e_lps[k].top}"
                gap = top[e] - top[g]
                assert gap <= NEAR_TIE_NATS, f"position {k}: eager prefers {e} over {g} by {gap:.3f} nats"
                break
            assert abs(g_lps[k].logprob - e_lps[k].logprob) <= NEAR_TIE_NATS, f"position {k}"
            agreed += 1
    print(f"{name}: {agreed} of {sum(len(g) for g, _ in with_graphs)} tokens agree before any near-tie")
    assert agreed >= len(with_graphs) * 2, "graphs and eager parted almost at once on every sequence"


@pytest.mark.parametrize("name", NAMES)
def test_one_host_sync_per_graph_decode_step(name):
    """The issue's goal on one GPU: a greedy decode step replayed from a graph synchronises with the host
    once (reading the sampled tokens). Counted with torch's sync debug mode (bench/runner.py)."""
    from moefleet.engine import LLMEngine
    from moefleet.engine.bench.runner import count_host_syncs
    from moefleet.engine.config import EngineConfig

    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model_dir(name)), device="cuda", dtype="bfloat16", max_num_seqs=8,
            max_num_batched_tokens=64, attention_backend="triton", cuda_graphs="auto",
        )
    )  # fmt: skip
    assert engine.model_runner.graph_runner is not None
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(3):
        engine.add_request(str(i), list(range(5 + i, 20 + i)), params)
    engine.step()  # the prompts
    counts = [count_host_syncs(engine.step) for _ in range(3)]
    print(f"{name}: host syncs per decode step {counts}")
    assert counts == [1, 1, 1]
