"""The real engine on tiny Qwen3-MoE, DeepSeek-V3 (MLA, grouped top-k, shared experts), GLM-4.5, gpt-oss and
Llama-4 checkpoints split over 2 ranks (and GLM-4.5 flat routing over 4 ranks on one node, Llama-4 and gpt-oss
over 4 ranks on 2 nodes) (DP attention, EP MoE over gloo
all_to_all): requests enter at rank 0 through the server-facing DPFrontEndClient, are placed on every rank,
and the greedy tokens equal a single-process run of the same model; a bad request is refused, not fatal."""

from __future__ import annotations

import signal
import time

import pytest
from moefleet.engine.distributed.ep import count_routed_expert_parameters
from moefleet.engine.distributed.watchdog import EXIT_CODE
from moefleet.engine.llm_engine import LLM
from moefleet.engine.sampling_params import SamplingParams
from support.tiny_models import one_torch_thread, tiny_model_dir

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

PROMPTS = [
    [5, 17, 42, 99, 3, 250],
    [7, 8],
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310],
    [11, 400, 12],
]
MAX_TOKENS = 6


@pytest.mark.parametrize(
    ("tiny", "nnodes", "nproc_per_node"),
    [
        ("qwen3_norm_topk", 1, 2),
        ("deepseek_grouped", 1, 2),
        ("glm4_grouped", 1, 2),
        ("gpt_oss_sliding", 1, 2),
        ("llama4_chunked", 1, 2),
        ("llama4_chunked", 2, 2),
        ("glm4_flat", 1, 4),
        ("gpt_oss_full_first", 2, 2),
    ],
    ids=lambda v: v if isinstance(v, str) else str(v),
)
def test_multi_rank_engine_matches_single_process(start_group, tiny, nnodes, nproc_per_node):
    world = nnodes * nproc_per_node
    model_dir = str(tiny_model_dir(tiny))
    group = start_group(
        "engine",
        nnodes,
        nproc_per_node,
        options={"model": model_dir, "prompts": PROMPTS, "max_tokens": MAX_TOKENS},
    )
    codes = group.wait(timeout_s=120 * world // 2)
    assert codes == [0] * world, [group.stderr(r)[-3000:] for r in range(world)]
    front, *others = group.results()
    with one_torch_thread():
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        single = LLM(model_dir, max_model_len=128)
        reference = single.generate(PROMPTS, greedy)
    full_expert_params = count_routed_expert_parameters(single.engine.model_runner.model)
    expected = {f"p{i}": r.token_ids for i, r in enumerate(reference)}
    assert {k: v for k, v in front["tokens"].items() if k != "bad"} == expected
    assert (
        front["tokens"]["bad"].startswith("RequestRejectedError: ") and "vocabulary" in front["tokens"]["bad"]
    )
    assert front["prompt_tokens_total"] > 0 and all(
        o["prompt_tokens_total"] > 0 for o in others
    )  # all served
    assert all(r["expert_params"] == full_expert_params // world > 0 for r in (front, *others))


def test_peer_death_fails_client_requests_and_exits(start_group):
    """Killing a DP rank mid-stream: rank 0's in-flight requests get an error and rank 0 exits (code 17)."""
    model_dir = str(tiny_model_dir("qwen3_norm_topk"))
    group = start_group("engine-peer-dies", 1, 2, options={"model": model_dir})
    for rank, proc in enumerate(group.procs):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", (rank, line, group.wait(1), group.stderr(rank)[-2000:])
    group.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes = group.wait(timeout_s=30)
    assert codes[0] == EXIT_CODE, group.stderr(0)[-3000:]
    assert time.monotonic() - killed_at < 20
    stdout, stderr = group.outputs[0]
    assert "CLIENT GOT EngineDeadError: the DP group stopped" in stdout, stdout
    assert "moefleet: rank 0 failed: DP engine loop stopped" in stderr, stderr[-3000:]


@pytest.mark.parametrize(
    ("tiny", "nnodes", "nproc_per_node", "tbo"),
    [("qwen3_norm_topk", 1, 2, "off"), ("deepseek_grouped", 2, 2, "off"), ("qwen3_norm_topk", 1, 2, "on")],
    ids=lambda v: v if isinstance(v, str) else str(v),
)
def test_group_agreed_graph_buckets_match_transformers(start_group, tiny, nnodes, nproc_per_node, tbo):
    """Expert-parallel decode steps replayed from per-bucket graphs (stand-ins on CPU that re-run the step over
    the static buffers, tests/support/stand_in_graphs.py): every rank replays the bucket of the group's most
    sequences, so ranks with fewer pad rows and idle ranks (the lone request) replay all-padding steps whose
    rows still route through the MoE exchange. Greedy tokens equal transformers; every rank replayed the same
    number of graph steps; idle ranks replayed too. With `tbo` on, the graphs hold the two-batch-overlap decode
    step (two micro-batches over views of the static buffers; idle ranks: two all-padding micro-batches)."""
    from support.reference import transformers_greedy

    world = nnodes * nproc_per_node
    model_dir = str(tiny_model_dir(tiny))
    lone = [44, 45, 46, 47, 48]
    prompts = [*PROMPTS, [90, 91, 92]]  # 5 requests: uneven per-rank batches (3 + 2, or 2 + 1 + 1 + 1)
    options = {
        "model": model_dir,
        "prompts": prompts,
        "lone_prompt": lone,
        "max_tokens": MAX_TOKENS,
        "stand_in_graphs": True,
        "engine": {"attention_backend": "triton", "max_num_seqs": 4, "tbo": tbo},
    }
    group = start_group("engine", nnodes, nproc_per_node, options=options)
    codes = group.wait(timeout_s=150 * world // 2)
    assert codes == [0] * world, [group.stderr(r)[-3000:] for r in range(world)]
    results = group.results()
    with one_torch_thread():
        expected = transformers_greedy(model_dir, [*prompts, lone], MAX_TOKENS, ignore_eos=True)
    front = results[0]
    assert [front["tokens"][f"p{i}"] for i in range(len(prompts))] == expected[:-1]
    assert front["lone"] == expected[-1]
    # every rank replayed the same buckets the same number of times (the group's bucket, not its own), and
    # the lone request's MAX_TOKENS - 1 decode steps ran from bucket 1 on every rank (idle ones included)
    by_bucket = [r["graph_replays"] for r in results]
    assert all(b == by_bucket[0] for b in by_bucket), by_bucket
    assert by_bucket[0].get(1, 0) >= MAX_TOKENS - 1 and sum(by_bucket[0].values()) > MAX_TOKENS, by_bucket
    # the dispatchers' pre-replay hooks ran once before every replay
    assert all(r["before_replay_calls"] == sum(r["graph_replays"].values()) for r in results)
    if tbo == "on":  # every step of every rank was a TBO step, the replayed ones included
        assert all(r["tbo_steps_total"] == r["num_steps_total"] > 0 for r in results)
