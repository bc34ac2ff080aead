"""`moefleet bench`: the HBM-floor arithmetic, the report, and real runs of the tiny preset on CPU."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton attention kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
from moefleet.engine.bench.command import run_options  # noqa: E402
from moefleet.engine.bench.floor import decode_step_bytes, expected_active_fraction  # noqa: E402
from moefleet.engine.bench.presets import PRESETS, preset_config  # noqa: E402
from moefleet.engine.bench.report import format_table, summarize  # noqa: E402
from moefleet.engine.bench.runner import BenchOptions, run_rank  # noqa: E402


def test_active_fraction_limits_and_value():
    assert expected_active_fraction(0, 8, 256) == 0.0
    assert expected_active_fraction(5, 4, 4) == 1.0
    # One token choosing 8 of 256 experts activates exactly 8/256 of them.
    assert math.isclose(expected_active_fraction(1, 8, 256), 8 / 256)
    # Many tokens activate nearly all experts.
    assert expected_active_fraction(10_000, 8, 256) > 0.999
    with pytest.raises(ValueError, match="top_k"):
        expected_active_fraction(1, 9, 8)


def test_decode_step_bytes_adds_weights_experts_and_kv():
    b = decode_step_bytes(
        dense_weight_bytes=1000, local_routed_expert_bytes=800, batch_per_rank=2, world_size=2,
        top_k=2, num_experts=4, kv_bytes_per_token=10, kv_len=50,
    )  # fmt: skip
    # 4 tokens in the group, each idles an expert with probability 1/2: active = 1 - 1/16.
    assert b.routed_experts == int(800 * (1 - 1 / 16))
    assert b.kv_cache == 2 * 50 * 10
    assert b.total == 1000 + b.routed_experts + 1000


def test_presets_keep_full_width_and_set_depth():
    ds = preset_config("deepseek-v3", num_layers=4, dense_layers=1)
    assert ds["hidden_size"] == 7168 and ds["n_routed_experts"] == 256
    assert ds["num_hidden_layers"] == 4 and ds["first_k_dense_replace"] == 1
    qw = preset_config("qwen3-30b-a3b", num_layers=3)
    assert qw["num_experts"] == 128 and qw["mlp_only_layers"] == []
    assert PRESETS["deepseek-v3"]["num_hidden_layers"] == 61  # presets are not mutated
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("llama")
    glm = preset_config("glm-4.5", num_layers=4, dense_layers=1)
    assert glm["n_routed_experts"] == 160 and glm["first_k_dense_replace"] == 1
    gpt = preset_config("gpt-oss-120b", num_layers=3)
    assert gpt["num_local_experts"] == 128 and gpt["layer_types"] == [
        "sliding_attention",
        "full_attention",
    ] * 1 + ["sliding_attention"]
    with pytest.raises(ValueError, match="gpt-oss has no dense layers"):
        preset_config("gpt-oss-120b", num_layers=3, dense_layers=1)
    llama = preset_config("llama4-maverick", num_layers=2)
    assert llama["num_local_experts"] == 128 and llama["moe_layers"] == [0, 1]


@pytest.mark.parametrize("preset", ["tiny-glm4", "tiny-gpt-oss", "tiny-llama4"])
def test_new_family_presets_run(preset):
    from dataclasses import replace

    result = run_rank(replace(_tiny("decode"), preset=preset)).to_dict()
    assert result["step_time_s"] > 0 and result["breakdown_s"]["experts"] > 0
    assert result["floor_bytes"]["total"] > result["floor_bytes"]["kv_cache"] > 0


def _tiny(mode: str) -> BenchOptions:
    return BenchOptions(
        preset="tiny-deepseek", num_layers=2, mode=mode, batch_size=4, kv_len=40, prefill_tokens=64,
        prefill_seq_len=32, steps=2, warmup=1, device="cpu", dtype="float32", block_size=16,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_single_rank_run_times_every_part(mode):
    result = run_rank(_tiny(mode)).to_dict()
    assert result["tokens_per_step"] == (4 if mode == "decode" else 64)
    assert len(result["step_times_s"]) == 2 and result["step_time_s"] > 0
    for part in ("attention", "dispatch", "experts", "combine"):
        assert result["breakdown_s"][part] > 0, part
    assert result["floor_bytes"]["total"] > result["floor_bytes"]["kv_cache"] > 0
    row = summarize(_asdict(_tiny(mode)), [result])
    table = format_table([row])
    assert "tiny-deepseek" in table and table.count("\n") == 2
    assert result["graph_timeline"] == {} and row["graph_step_ms_profiled"] is None  # no graphs, no timeline


def _asdict(options: BenchOptions) -> dict:
    from dataclasses import asdict

    return asdict(options)


@pytest.mark.multiprocess
def test_two_rank_expert_parallel_run():
    ranks = run_options(_tiny("decode"), 2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["tokens_per_step"] == 4 for r in ranks)
    # Replicated (non-expert) weights are the same on every rank.
    single = run_rank(_tiny("decode")).to_dict()
    assert ranks[0]["breakdown_s"]["dispatch"] > 0
    assert ranks[0]["floor_bytes"]["dense_weights"] == single["floor_bytes"]["dense_weights"]


@pytest.mark.multiprocess
def test_two_rank_tbo_run_over_all_to_all():
    """`--tbo on --nproc-per-node 2`: two micro-batches per step over a real gloo group (CPU: no streams, no
    graphs); every rank runs the same TBO steps, so the collectives line up and the run completes."""
    from dataclasses import replace

    ranks = run_options(
        replace(_tiny("decode"), tbo="on", backend="a2a", breakdown=False, tbo_timeline=True), 2
    )
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["tokens_per_step"] == 4 and len(r["step_times_s"]) > 0 for r in ranks)
    assert all(r["cuda_graphs"].startswith("off:") for r in ranks)
    # --tbo-timeline: one more eager TBO step, every stage of both micro-batches timed (CPU: one stream, the
    # stages in launch order, so nothing is hidden)
    for r in ranks:
        timeline = r["tbo_timeline"]
        spans = timeline["spans"]
        assert {s["micro_batch"] for s in spans} == {0, 1} and {s["kind"] for s in spans} == {
            "compute",
            "comm",
        }
        assert len(spans) % 8 == 0 and timeline["comm_ms"] > 0 and timeline["hidden_ms"] == pytest.approx(0)
        assert timeline["step_ms"] >= timeline["compute_ms"] > 0


def test_forward_flops_hand_counted():
    from moefleet.engine.bench.flops import forward_flops, peak_flops

    gqa = {
        "hidden_size": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2,
        "num_hidden_layers": 1, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 3,
        "intermediate_size": 7, "vocab_size": 10, "decoder_sparse_step": 1, "mlp_only_layers": [],
    }  # fmt: skip
    # 3 tokens x (attention 48 + router 16 + experts 72) + 6 causal pairs x 8 + LM head 40 = 496 MACs.
    assert forward_flops(gqa, [3], [3], num_sampled=1) == 2 * 496
    mla = {
        "hidden_size": 4, "num_attention_heads": 1, "kv_lora_rank": 2, "q_lora_rank": None,
        "qk_nope_head_dim": 1, "qk_rope_head_dim": 1, "v_head_dim": 1, "num_hidden_layers": 2,
        "first_k_dense_replace": 1, "intermediate_size": 5, "moe_intermediate_size": 2,
        "n_routed_experts": 2, "num_experts_per_tok": 1, "n_shared_experts": 1, "vocab_size": 3,
    }  # fmt: skip
    # 2 new tokens over 2 cached: 7 visible pairs, 4 context rows expanded through kv_b.
    # dense layer 2 x (24 + 60) + 4 x 4 + 7 x 3 = 205; MoE layer 2 x (24 + 56) + 16 + 21 = 197; head 12.
    assert forward_flops(mla, [2], [4], num_sampled=1) == 2 * (205 + 197 + 12)
    assert peak_flops("NVIDIA H200") == 989.4e12 and peak_flops("cpu") is None


def test_each_step_prepares_a_new_batch_and_reports_it():
    from moefleet.engine.bench import runner

    built = []
    original = runner.prepare
    runner.prepare = lambda *a: built.append(1) or original(*a)  # type: ignore[assignment]
    try:
        result = run_rank(_tiny("prefill")).to_dict()
    finally:
        runner.prepare = original  # type: ignore[assignment]
    options = _tiny("prefill")
    # warm-up + timed + instrumented steps each build their own ForwardBatch
    assert len(built) == options.warmup + options.steps + max(2, options.steps // 2)
    assert len(result["prepare_times_s"]) == options.steps and result["prepare_time_s"] > 0
    assert result["attention_backend"] == "torch" and result["cuda_graphs"].startswith("off")
    assert result["flops_per_step"] > 0
    row = summarize(_asdict(options), [result])
    assert row["mfu"] is None  # no peak known for a CPU
    assert "| torch | off | - |" in format_table([row])  # no sync count off CUDA


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_triton_attention_backend_runs_in_the_bench(mode):
    """`--attention-backend triton` on CPU (interpreted kernels): same tokens per step, the backend named."""
    pytest.importorskip("moefleet.engine.kernels.paged_attention")
    from dataclasses import replace

    options = replace(_tiny(mode), attention_backend="triton", steps=1, warmup=1, breakdown=False)
    result = run_rank(options).to_dict()
    assert result["attention_backend"] == "triton" and result["tokens_per_step"] == (
        4 if mode == "decode" else 64
    )
    assert result["step_time_s"] > 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_parses_as_its_architecture(preset):
    from moefleet.engine.models import model_class

    config = preset_config(preset, num_layers=2)
    parsed = model_class(config["architectures"][0]).config_class.from_dict(config)  # type: ignore[attr-defined]
    assert parsed.hidden_size == PRESETS[preset]["hidden_size"]


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_tbo_on_runs_two_micro_batches_and_auto_stays_off(mode, monkeypatch):
    from dataclasses import replace

    from moefleet.engine import tbo

    seen = []
    real = tbo.forward_tbo
    monkeypatch.setattr(
        tbo, "forward_tbo", lambda model, fb, **kw: seen.append(fb.num_tokens) or real(model, fb, **kw)
    )
    on = run_rank(replace(_tiny(mode), tbo="on")).to_dict()
    assert seen and set(seen) == {on["tokens_per_step"]}
    assert on["cuda_graphs"].startswith("off:") and on["breakdown_s"] == {}  # CPU: no graphs
    seen.clear()
    run_rank(replace(_tiny(mode), tbo="auto", breakdown=False))
    assert seen == []  # no measured threshold: auto is off
    with pytest.raises(ValueError, match="tbo"):
        replace(_tiny(mode), tbo="sometimes")


def test_random_init_gives_float32_gates_the_checkpoints_dtype():
    from moefleet.engine.bench.runner import random_init
    from moefleet.engine.layers.router import Router, RoutingConfig

    model = torch.nn.ModuleDict(
        {"gate": Router(64, RoutingConfig(num_experts=8, top_k=2, scoring="sigmoid")),
         "proj": torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)}
    )  # fmt: skip
    random_init(model, 0, torch.bfloat16)
    gate = model["gate"].weight
    assert gate.dtype == torch.float32 and gate.std() > 0.01
    assert torch.equal(gate.to(torch.bfloat16).float(), gate)  # bf16 numbers, kept in float32
    random_init(model, 0)  # float32 runs: untouched draws
    assert not torch.equal(model["gate"].weight.to(torch.bfloat16).float(), model["gate"].weight)
