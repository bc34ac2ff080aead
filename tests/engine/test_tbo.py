"""Two-batch overlap (engine/tbo.py), one process: the split (hand-computed cuts), the launch order (a
recording dispatcher), and greedy outputs with TBO on equal transformers token for token on the tiny models
(chunked prefill cutting sequences between micro-batches, odd numbers of sequences, lone requests)."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import LLM, SamplingParams, model_runner
from moefleet.engine.config import EngineConfig
from moefleet.engine.forward_batch import ForwardBatch
from moefleet.engine.layers.moe import MoE
from moefleet.engine.layers.token_dispatch import LocalDispatcher
from moefleet.engine.llm_engine import LLMEngine
from moefleet.engine.tbo import (
    SplitPlan,
    forward_tbo,
    num_micro_batches,
    plan_split,
    schedule,
    split_batch,
    stream_schedule,
    wants_tbo,
)
from support.forward_batches import three_prompts
from support.reference import transformers_greedy
from support.tiny_models import TINY_CONFIGS, tiny_model_dir

pytestmark = pytest.mark.timeout(600)

# ---- the split (pure) -------------------------------------------------------------------------------------


def test_decode_splits_by_sequences_first_half_rounded_up():
    # Attention cost of a decode token = its KV length.
    assert plan_split([1, 1, 1], [5, 7, 9]) == SplitPlan(2, 0, 2, (12, 9))
    assert plan_split([1] * 4, [3] * 4) == SplitPlan(2, 0, 2, (6, 6))
    assert plan_split([1], [4]) == SplitPlan(1, 0, 1, (4, 0))  # a lone decode: micro-batch 1 is empty
    assert plan_split([], []) == SplitPlan(0, 0, 0, (0, 0))  # idle rank: two empty micro-batches


def test_prefill_cuts_at_balanced_attention_cost():
    # One fresh 8-token prompt: token costs 1..8 (total 36); 5 tokens = 15, 6 = 21: both 3 off, first wins.
    assert plan_split([8], [8]) == SplitPlan(0, 5, 5, (15, 21))
    # Two equal prompts: the cut is the sequence boundary, nothing is cut.
    assert plan_split([6, 6], [6, 6]) == SplitPlan(1, 0, 6, (21, 21))
    # Chunked prefill: a 4-token chunk after 6 cached tokens costs 7+8+9+10 = 34, a fresh 4-token prompt 10;
    # half of 44 is 22: 3 tokens of the chunk (24) beat 2 (15).
    assert plan_split([4, 4], [10, 4]) == SplitPlan(0, 3, 3, (24, 20))
    # Mixed: a decode (KV 20) then a fresh 6-token prompt (21): cut between them.
    assert plan_split([1, 6], [20, 6]) == SplitPlan(1, 0, 1, (20, 21))
    # A very long cached prefix: both sides keep at least one token.
    plan = plan_split([2], [1000])
    assert plan.token_cut == 1 and plan.costs == (999, 1000)
    assert plan_split([6, 6], [6, 6]).imbalance == 0.0
    assert plan_split([1], [4]).imbalance == 1.0


def test_split_batch_children_cover_the_parent():
    fb = ForwardBatch.build(
        input_ids=list(range(10, 18)),
        positions=[6, 7, 8, 9, 0, 1, 2, 3],
        query_lens=[4, 4],
        seq_lens=[10, 4],
        block_tables=[[3, 4, 5], [7]],
        block_size=4,
        device="cpu",
    )
    a, b = split_batch(fb, plan_split(fb.query_lens, fb.seq_lens))
    assert (a.query_lens, a.seq_lens, b.query_lens, b.seq_lens) == ([3], [9], [1, 4], [10, 4])
    assert a.input_ids.tolist() == [10, 11, 12] and b.input_ids.tolist() == [13, 14, 15, 16, 17]
    assert a.positions.tolist() == [6, 7, 8] and b.positions.tolist() == [9, 0, 1, 2, 3]
    # Slots: positions 6, 7 are block 4 offsets 2, 3; positions 8, 9 block 5 offsets 0, 1; seq 1 is block 7.
    assert a.slot_mapping.tolist() == [4 * 4 + 2, 4 * 4 + 3, 5 * 4 + 0]
    assert b.slot_mapping.tolist() == [5 * 4 + 1, 28, 29, 30, 31]
    assert a.block_tables.tolist() == [[3, 4, 5]] and b.block_tables.tolist() == [[3, 4, 5], [7, -1, -1]]
    assert a.cu_query_lens.tolist() == [0, 3] and b.cu_query_lens.tolist() == [0, 1, 5]
    assert b.seq_lens_t.tolist() == [10, 4] and a.mode.value == "extend" and b.mode.value == "mixed"
    idle_a, idle_b = split_batch(
        ForwardBatch.build(
            input_ids=[],
            positions=[],
            query_lens=[],
            seq_lens=[],
            block_tables=[],
            block_size=4,
            device="cpu",
        ),
        plan_split([], []),
    )
    assert idle_a.num_tokens == idle_b.num_tokens == 0 and idle_a.mode.value == "idle"


def test_policy_auto_stays_off_until_measured():
    assert wants_tbo("on", 1, False) and not wants_tbo("off", 10**6, True)
    assert not any(wants_tbo("auto", n, p) for n in (1, 256, 16384) for p in (False, True))
    assert num_micro_batches("on") == 2 and num_micro_batches("auto") == num_micro_batches("off") == 1
    with pytest.raises(ValueError, match="tbo"):
        wants_tbo("sometimes", 1, False)


def test_schedule_runs_micro_batch_0_two_stages_ahead():
    assert schedule(4, 2) == [(0, 0), (0, 1), (0, 2), (1, 0), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert schedule(3, 0) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    for n, lead in ((8, 2), (5, 1), (1, 3)):
        order = schedule(n, lead)
        assert sorted(order) == [(m, i) for m in (0, 1) for i in range(n)]
        assert all(order.index((0, i)) < order.index((1, i)) for i in range(n))


def test_stream_schedule_alternates_compute_and_sends_comm_first():
    kinds = ["compute", "comm", "compute", "comm"]  # attention | dispatch | experts | combine
    assert stream_schedule(kinds) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    layers = kinds * 3 + ["compute"]  # three MoE layers and a dense one
    order = stream_schedule(layers)
    assert sorted(order) == [(m, i) for m in (0, 1) for i in range(len(layers))]
    assert all(order.index((0, i)) < order.index((1, i)) for i in range(len(layers)))
    compute = [m for m, i in order if layers[i] == "compute"]
    assert compute == [0, 1] * (len(compute) // 2)  # the compute stream alternates micro-batches
    comm = [(m, i) for m, i in order if layers[i] == "comm"]
    assert [i for _, i in comm] == sorted(i for _, i in comm)  # transfers in stage order, micro-batch 0 first


# ---- launch order, with a recording dispatcher -----------------------------------------------------------


class RecordingDispatcher:
    """A real LocalDispatcher that logs each call as (event, micro-batch, layer)."""

    def __init__(self, inner: LocalDispatcher, micro_batch: int, layer: int, log: list):
        self.inner, self.micro_batch, self.layer, self.log = inner, micro_batch, layer, log

    def _call(self, name, *args, **kwargs):
        self.log.append((name, self.micro_batch, self.layer))
        return getattr(self.inner, name)(*args, **kwargs)

    def dispatch_start(self, *args, **kwargs):
        return self._call("dispatch_start", *args, **kwargs)

    def dispatch_finish(self, *args):
        return self._call("dispatch_finish", *args)

    def combine_start(self, *args):
        return self._call("combine_start", *args)

    def combine_finish(self, *args):
        return self._call("combine_finish", *args)


def _record(model, log):
    """Install recording dispatchers (one per micro-batch) and log attention calls by their batch."""
    layers = list(model.model.layers)
    assert all(isinstance(layer.mlp, MoE) for layer in layers)
    for index, layer in enumerate(layers):
        inner = layer.mlp.dispatcher
        layer.mlp.dispatchers = [RecordingDispatcher(inner, m, index, log) for m in (0, 1)]
        layer.mlp.dispatcher = layer.mlp.dispatchers[0]

        def hook(_module, args, index=index):
            log.append(("attention", args[2], index))

        layer.self_attn.register_forward_pre_hook(hook)
    return len(layers)


def test_compute_of_one_micro_batch_is_enqueued_before_the_others_blocking_dispatch():
    llm = LLM(tiny_model_dir("qwen3_norm_topk"), dtype="float32", max_model_len=64)
    model = llm.engine.model_runner.model
    log: list = []
    num_layers = _record(model, log)
    runner = llm.engine.model_runner
    fb = three_prompts(runner)
    with torch.inference_mode():
        forward_tbo(model, fb)
    batches = [e[1] for e in log if e[0] == "attention"]
    first, second = batches[0], next(b for b in batches if b is not batches[0])
    assert (first.num_tokens, second.num_tokens) == (8, 7)
    events = [(name, 0 if m is first else 1 if m is second else m, layer) for name, m, layer in log]
    # Expected by hand: micro-batch 0 runs two stages ahead (attention | dispatch | experts | combine).
    expected = []

    def stage(m, i):
        layer, kind = divmod(i, 4)
        expected.extend(
            [
                [("attention", m, layer)],
                [("dispatch_start", m, layer)],
                [("dispatch_finish", m, layer), ("combine_start", m, layer)],
                [("combine_finish", m, layer)],
            ][kind]
        )

    for m, i in schedule(4 * num_layers, 2):
        stage(m, i)
    assert events == expected
    # The launch-order rule: before each blocking dispatch (all but micro-batch 0's first), the other
    # micro-batch's latest compute is already issued: its experts of this layer (micro-batch 1 dispatching)
    # or of the previous layer (micro-batch 0 dispatching).
    checked = 0
    for position, (name, m, layer) in enumerate(events):
        if name == "dispatch_start" and (m, layer) != (0, 0):
            other_experts = ("combine_start", 1 - m, layer if m == 1 else layer - 1)
            assert other_experts in events[:position], (name, m, layer)
            checked += 1
    assert checked == 2 * num_layers - 1
    # The plain forward runs the same stages in order, on micro-batch 0's dispatcher.
    log.clear()
    with torch.inference_mode():
        model(fb.input_ids, fb.positions, fb)
    assert [(n, m, layer) for n, m, layer in log if n != "attention"] == [
        (n, 0, layer)
        for layer in range(num_layers)
        for n in ("dispatch_start", "dispatch_finish", "combine_start", "combine_finish")
    ]


def test_tbo_without_a_second_dispatcher_says_what_to_install():
    llm = LLM(tiny_model_dir("qwen3_norm_topk"), dtype="float32", max_model_len=64)
    model = llm.engine.model_runner.model
    for layer in model.model.layers:
        layer.mlp.dispatchers = [RecordingDispatcher(layer.mlp.dispatcher, 0, 0, [])]
    with pytest.raises(RuntimeError, match="num_micro_batches=2"), torch.inference_mode():
        forward_tbo(model, ForwardBatch.build(
            input_ids=[3, 4], positions=[0, 0], query_lens=[1, 1], seq_lens=[1, 1], block_tables=[[0], [1]],
            block_size=16, device="cpu",
        ))  # fmt: skip


# ---- greedy outputs equal transformers ---------------------------------------------------------------------

NEW_TOKENS = 8
PROMPTS = [  # token ids; distinct lengths, one long enough to be chunked and cut
    [5, 9, 14, 3, 22, 7, 40, 11, 2, 31, 8, 19, 27, 6, 13, 50, 4, 17, 21, 35, 10, 44, 12, 29, 33, 16, 38],
    [7, 3, 12],
    [100, 4, 9, 61, 2, 8, 15, 23, 42, 5, 77],
]


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_with_tbo_on_equals_transformers(name, monkeypatch):
    path = tiny_model_dir(name)
    plans: list[SplitPlan] = []

    def recording_forward_tbo(model, fb):
        hidden, plan = forward_tbo(model, fb)
        plans.append(plan)
        return hidden, plan

    monkeypatch.setattr(model_runner, "forward_tbo", recording_forward_tbo)
    expected = transformers_greedy(path, PROMPTS, NEW_TOKENS)
    # A small token budget: prompts are chunked and mixed with decodes; 3 sequences (odd) decode together.
    llm = LLM(
        str(path), dtype="float32", max_model_len=128, max_num_batched_tokens=10, max_num_seqs=4, tbo="on"
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got = [r.token_ids for r in llm.generate(PROMPTS, params)]
    assert got == expected
    assert any(p.cut_tokens for p in plans), "no step cut a sequence between the micro-batches"
    stats = llm.engine.stats()
    assert stats["tbo_steps_total"] == llm.engine.num_steps_total > 0
    # A lone request: every decode step has one sequence, so micro-batch 1 is empty.
    alone = [r.token_ids for r in llm.generate(PROMPTS[1:2], params)]
    assert alone == expected[1:2]
    assert llm.engine.stats()["tbo_last_split_imbalance"] == 1.0


def test_tbo_off_and_auto_run_plain_steps(tmp_path):
    path = tiny_model_dir("qwen3_norm_topk")
    for mode in ("off", "auto"):
        engine = LLMEngine(EngineConfig(model=str(path), max_model_len=64, tbo=mode))
        engine.add_request("r", [3, 4, 5], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.stats()["tbo_steps_total"] == 0
    with pytest.raises(ValueError, match="tbo"):
        EngineConfig(model=str(path), tbo="maybe")


# ---- flags and metrics ---------------------------------------------------------------------------------------


def test_serve_flag_reaches_the_engine_config():
    from moefleet.engine.cli import build_parser
    from moefleet.engine.entrypoints.serve_command import engine_config

    path = str(tiny_model_dir("qwen3_norm_topk"))
    assert engine_config(build_parser().parse_args(["serve", "--model", path, "--tbo", "on"])).tbo == "on"
    assert engine_config(build_parser().parse_args(["serve", "--model", path])).tbo == "auto"
    bench = build_parser().parse_args(["bench", "--tbo", "off"])
    assert bench.tbo == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", path, "--tbo", "maybe"])


def test_metrics_count_group_tbo_steps_and_label_each_ranks_imbalance():
    from moefleet.engine.server.metrics import ServerMetrics
    from prometheus_client.parser import text_string_to_metric_families

    ranks = [
        {"tbo_steps_total": 7, "tbo_last_split_imbalance": 0.25},
        {"tbo_steps_total": 7, "tbo_last_split_imbalance": 1.0},
    ]
    text = ServerMetrics(lambda: ranks[0], lambda: ranks).render().decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert got[("moefleet_tbo_steps_total", ())] == 7  # the group's steps, not 7 + 7
    assert got[("moefleet_tbo_split_imbalance", (("dp_rank", "0"),))] == 0.25
    assert got[("moefleet_tbo_split_imbalance", (("dp_rank", "1"),))] == 1.0
