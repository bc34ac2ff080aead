"""`moefleet bench --emulate-ep N --project-layers L`: per-GPU shapes, the emulating dispatcher, the depth
projection, and a tiny end-to-end run on CPU."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

if not torch.cuda.is_available():  # the Triton attention kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
from moefleet.engine import topology  # noqa: E402
from moefleet.engine.bench.emulate import (  # noqa: E402
    EmulatedEPDispatcher,
    EmulatedShape,
    install_emulated_dispatchers,
    local_expert_ids,
)
from moefleet.engine.bench.projection import (  # noqa: E402
    REFERENCE,
    bandwidth_note,
    fit_depths,
    project,
)
from moefleet.engine.bench.runner import BenchOptions, run_rank  # noqa: E402
from moefleet.engine.cli import main  # noqa: E402
from moefleet.engine.topology import Topology  # noqa: E402

pytestmark = pytest.mark.timeout(300)


# ---- shapes ---------------------------------------------------------------------------------------------


def test_deepseek_decode_ep72_and_prefill_ep32_shapes():
    decode = EmulatedShape(ep_size=72, num_experts=256, num_redundant_experts=32, top_k=8, tokens_per_gpu=256)
    # (256 + 32) / 72 = 4 experts; 256 x 8 = 2,048 rows, 512 per expert.
    assert (decode.physical_experts, decode.experts_per_gpu, decode.rows_per_gpu) == (288, 4, 2048)
    assert decode.rows_per_expert == 512
    prefill = EmulatedShape(
        ep_size=32, num_experts=256, num_redundant_experts=32, top_k=8, tokens_per_gpu=16384
    )
    # DeepSeek's own prefill: 9 routed experts per GPU at EP32 with 32 redundant.
    assert (prefill.experts_per_gpu, prefill.rows_per_gpu) == (9, 131072)
    assert EmulatedShape(32, 256, 0, 8, 16384).experts_per_gpu == 8


def test_shape_errors_say_what_to_change():
    with pytest.raises(ValueError, match=r"use --num-redundant-experts 32"):
        EmulatedShape(ep_size=72, num_experts=256, num_redundant_experts=0, top_k=8, tokens_per_gpu=256)
    with pytest.raises(ValueError, match=r"--emulate-ep \(0\) must be >= 1"):
        EmulatedShape(0, 256, 0, 8, 1)
    with pytest.raises(ValueError, match="top_k"):
        EmulatedShape(4, 8, 0, 9, 1)


# ---- the emulating dispatcher ------------------------------------------------------------------------------


def test_local_expert_ids_by_hand():
    ids = torch.tensor([[0, 5], [11, -1], [287, 4]])
    assert local_expert_ids(ids, 4).tolist() == [[0, 1], [3, -1], [3, 0]]


def test_dispatcher_sends_every_hit_to_local_experts_and_combines_weighted():
    torch.manual_seed(0)
    tokens, top_k, local = 6, 3, 4
    hidden = torch.randn(tokens, 5)
    ids = torch.randint(0, 288, (tokens, top_k))
    ids[2, 1] = -1  # a padding hit
    weights = torch.rand(tokens, top_k)
    dispatcher = EmulatedEPDispatcher(local)
    dispatched = dispatcher.dispatch_finish(dispatcher.dispatch_start(hidden, ids, weights))
    counts = dispatched.tokens_per_expert
    assert counts is not None and len(counts) == local and sum(counts) == tokens * top_k - 1
    # Experts: local expert e multiplies its rows by (e + 1).
    scale = torch.cat([torch.full((n, 1), e + 1.0) for e, n in enumerate(counts)])
    out = dispatcher.combine_finish(dispatcher.combine_start(dispatched.hidden * scale, dispatched))
    expected = torch.zeros_like(hidden)
    for t in range(tokens):
        for k in range(top_k):
            if ids[t, k] >= 0:
                expected[t] += weights[t, k] * hidden[t] * (int(ids[t, k]) % local + 1)
    torch.testing.assert_close(out, expected)


def test_emulated_transfers_wait_on_the_gpu_once_per_dispatch_and_combine():
    """--emulate-comm-us: dispatch_start and combine_start each ask for one GPU wait on the current stream (TBO's
    comm stream: the dispatcher then asks for it), in nanoseconds proportional to the tokens moved (the step's
    full batch of 8 tokens waits 1.2 us, a micro-batch of 2 of them a quarter); the rows are unchanged."""
    waits: list[int] = []
    tokens, top_k, local = 2, 2, 3
    hidden, ids, weights = (
        torch.randn(tokens, 4),
        torch.randint(0, 12, (tokens, top_k)),
        torch.rand(tokens, top_k),
    )
    plain = EmulatedEPDispatcher(local, wait=waits.append)
    waiting = EmulatedEPDispatcher(local, comm_us=1.2, full_tokens=8, wait=waits.append)
    assert (plain.TBO_OVERLAP, waiting.TBO_OVERLAP) == ("none", "comm_stream")
    outs = []
    for dispatcher in (plain, waiting):
        dispatched = dispatcher.dispatch_finish(dispatcher.dispatch_start(hidden, ids, weights))
        assert waits == ([300] if dispatcher is waiting else [])
        outs.append(dispatcher.combine_finish(dispatcher.combine_start(dispatched.hidden * 2, dispatched)))
    assert waits == [300, 300]
    torch.testing.assert_close(outs[0], outs[1])
    waiting.dispatch_start(hidden[:0], ids[:0], weights[:0])  # an empty micro-batch waits for nothing
    assert waits == [300, 300]
    with pytest.raises(ValueError, match="comm_us"):
        EmulatedEPDispatcher(local, comm_us=-1)


def test_emulated_dispatchers_wait_with_the_given_waiter_by_default_the_gpu_timer_spin():
    from moefleet.engine.kernels.gpu_wait import gpu_wait

    assert EmulatedEPDispatcher(3, comm_us=5.0).wait is gpu_wait


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"emulate_comm_us": 100.0}, "add --emulate-ep N (and --device cuda)"),  # CPU
        ({"emulate_comm_us": 100.0, "emulate_ep": 0, "device": "cuda"}, "add --emulate-ep N"),
        ({"emulate_comm_us": -1.0}, "must be >= 0"),
    ],
)
def test_emulated_comm_needs_the_one_gpu_emulation(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _tiny(**overrides)


def test_emulated_comm_is_refused_on_several_gpus_and_described_on_one():
    from moefleet.engine.bench.command import emulated_shape_line

    options = _tiny()
    object.__setattr__(
        options, "emulate_comm_us", 150.0
    )  # past validation (CPU): the line is what is checked
    assert "a 150 us GPU wait per dispatch and per combine" in emulated_shape_line(options, 1)
    with pytest.raises(ValueError, match="drop --emulate-comm-us or --nproc-per-node"):
        emulated_shape_line(options, 2)


def test_model_built_under_the_emulated_topology_holds_the_per_gpu_experts():
    from moefleet.engine.bench.presets import preset_config
    from moefleet.engine.loader import build_model

    config = preset_config("tiny-deepseek", num_layers=2)  # 8 experts
    with topology.use(Topology.for_rank(0, 4, num_redundant_experts=4)):  # 12 slots / 4 = 3 per GPU
        model = build_model(config, torch.device("cpu"), "float32")
    assert install_emulated_dispatchers(model, num_micro_batches=2) == 2
    for layer in (m for m in model.modules() if hasattr(m, "dispatchers")):
        assert len(layer.experts.local_experts) == 3 and len(layer.dispatchers) == 2


# ---- projection -------------------------------------------------------------------------------------------


def test_projection_by_hand():
    fit = fit_depths([(2, 0.010), (4, 0.016)])
    assert math.isclose(fit.slope_s, 0.003) and math.isclose(fit.intercept_s, 0.004)
    # Least squares through three collinear points is the same line.
    again = fit_depths([(2, 0.010), (3, 0.013), (4, 0.016)])
    assert math.isclose(again.slope_s, 0.003) and math.isclose(again.intercept_s, 0.004)
    p = project(fit, 61, tokens_per_step=256, moe_layers=58, comm_s_per_layer=100e-6)
    # 0.004 + 61 x 0.003 + 58 x 0.0001 = 0.1928 s.
    assert math.isclose(p.step_s, 0.1928) and math.isclose(p.tokens_per_s, 256 / 0.1928)
    with pytest.raises(ValueError, match="two different depths"):
        fit_depths([(2, 0.01), (2, 0.02)])


def test_references_and_bandwidth_note():
    assert (
        round(REFERENCE["prefill"].tokens_per_s_per_gpu) == 6288
        and REFERENCE["decode"].tokens_per_s_per_gpu == 2790
    )
    note = bandwidth_note("NVIDIA H200")
    assert "H200 (4.80 TB/s HBM)" in note and "H100 (3.35 TB/s)" in note and "1.43x" in note
    assert "H100" in bandwidth_note("cpu")


# ---- end to end on CPU ---------------------------------------------------------------------------------------


def _tiny(**overrides) -> BenchOptions:
    base = dict(
        preset="tiny-deepseek", num_layers=2, mode="decode", batch_size=4, kv_len=40, steps=2, warmup=1,
        device="cpu", dtype="float32", block_size=16, emulate_ep=4,
    )  # fmt: skip
    return BenchOptions(**{**base, **overrides})


def test_emulated_rank_reports_per_gpu_experts_and_rows():
    result = run_rank(_tiny()).to_dict()
    # 8 experts over EP4 -> 2 per GPU; 4 tokens x top-2 = 8 routed rows per MoE layer, all computed here.
    assert (result["emulated_ep"], result["experts_per_gpu"], result["routed_rows_per_layer"]) == (4, 2, 8)
    assert result["breakdown_s"]["experts"] > 0 and result["step_time_s"] > 0
    assert topology.current() == Topology()  # the bench restores the build-time topology


def test_moe_metrics_every_records_the_timed_steps_samples(capsys):
    """--moe-metrics-every 2 installs the serving path's metered dispatchers: of the 4 timed steps (the
    warm-up is paused, not counted) 2 are sampled, each with one dispatch and one combine per MoE layer and
    the received rows' bytes (4 tokens x top-2 = 8 rows x 64 wide x 4 bytes per layer, tiny-deepseek in
    float32)."""
    result = run_rank(_tiny(steps=4, moe_metrics_every=2, breakdown=False)).to_dict()
    metrics = result["moe_metrics"]
    layers = 2  # tiny-deepseek at 2 layers: both MoE (dense_layers 0 at few layers)
    assert metrics["sampled_forwards"] == 2
    assert metrics["dispatch_samples"] == metrics["combine_samples"] == 2 * layers
    assert metrics["dispatch_mean_s"] > 0 and metrics["combine_mean_s"] > 0
    assert metrics["bytes"] == 2 * layers * 8 * 64 * 4
    assert "MoE metrics (one forward in 2): 2 sampled forwards" in capsys.readouterr().err
    assert run_rank(_tiny(steps=2, breakdown=False)).to_dict()["moe_metrics"] == {}  # off by default


def test_moe_metrics_need_dispatchers():
    with pytest.raises(ValueError, match="--moe-metrics-every meters expert-parallel dispatchers"):
        run_rank(_tiny(emulate_ep=0, moe_metrics_every=2, breakdown=False))
    with pytest.raises(ValueError, match="must be >= 0"):
        _tiny(moe_metrics_every=-1)


def test_cli_emulates_and_projects(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "bench", "--preset", "tiny-deepseek", "--device", "cpu", "--dtype", "float32", "--mode", "decode",
        "--batch-size", "4", "--kv-len", "40", "--steps", "2", "--warmup", "1", "--block-size", "16",
        "--no-breakdown", "--emulate-ep", "4", "--project-layers", "61", "--project-depths", "1,2",
        "--comm-us-per-layer", "50", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "emulating one GPU of EP4: 8 physical experts -> 2 per GPU" in printed
    assert "Projected to 61 layers" in printed and "SGLang DeepSeek-R1 decode EP72" in printed
    data = json.loads(out.read_text())
    (t1, t2) = (run["summary"]["step_ms"] for run in data["runs"])
    proj = data["projections"][0]
    # Recomputed from the two measured rows: slope = t(2) - t(1), intercept = t(1) - slope.
    assert math.isclose(proj["slope_ms_per_layer"], t2 - t1)
    assert math.isclose(proj["intercept_ms"], t1 - (t2 - t1), abs_tol=1e-9)
    assert math.isclose(proj["projected_step_ms"], proj["intercept_ms"] + 61 * (t2 - t1) + 61 * 0.05)
    assert math.isclose(proj["projected_tokens_per_s_per_gpu"], 4 / (proj["projected_step_ms"] / 1e3))
    assert (proj["emulated_ep"], proj["experts_per_gpu"], proj["routed_rows_per_layer"]) == (4, 2, 8)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--emulate-ep", "3"], "use --num-redundant-experts 1"),
        (["--emulate-ep", "4", "--nproc-per-node", "8"], "--nproc-per-node (8) must be <= --emulate-ep (4)"),
        (["--project-layers", "61", "--project-depths", "2"], "two or more different depths"),
        (["--emulate-ep", "4", "--eplb"], "--eplb rebalances a real group"),
    ],
)
def test_cli_refuses_bad_shapes(capsys, extra, message):
    argv = ["bench", "--preset", "tiny-deepseek", "--device", "cpu", "--mode", "decode", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
