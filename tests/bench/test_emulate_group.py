"""`moefleet bench --emulate-ep N --nproc-per-node W`: the balanced id rewrite, the routing wrapper around a
real dispatcher, the shape checks, the received-rows count, and 2-rank runs over a real gloo group on CPU."""

from __future__ import annotations

import os
from dataclasses import asdict

import pytest
import torch

if not torch.cuda.is_available():  # the Triton attention kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
from moefleet.engine.bench.command import emulated_shape_line, run_options  # noqa: E402
from moefleet.engine.bench.emulate import (  # noqa: E402
    EmulatedRoutingDispatcher,
    EmulatedShape,
    balanced_slot_ids,
    emulated_routing,
    emulated_shape,
)
from moefleet.engine.bench.received import count_received_rows  # noqa: E402
from moefleet.engine.bench.report import summarize  # noqa: E402
from moefleet.engine.bench.runner import BenchOptions  # noqa: E402
from moefleet.engine.cli import main  # noqa: E402
from moefleet.engine.layers.token_dispatch import LocalDispatcher  # noqa: E402

pytestmark = pytest.mark.timeout(300)


# ---- the id rewrite -----------------------------------------------------------------------------------------


def test_balanced_slot_ids_by_hand():
    ids = torch.tensor([[7, 3], [0, -1], [5, 5]])
    # hit (t, k) -> (t * 2 + k) mod 4; the padding hit stays -1
    assert balanced_slot_ids(ids, 4).tolist() == [[0, 1], [2, -1], [0, 1]]
    # offset 2 (rank 1 of 2 with 2 slots each) starts at that rank's first slot
    assert balanced_slot_ids(ids, 4, offset=2).tolist() == [[2, 3], [0, -1], [2, 3]]


@pytest.mark.parametrize(
    ("tokens", "top_k", "slots", "offset"),
    [
        (256, 8, 8, 0),
        (256, 8, 8, 4),
        (37, 8, 12, 3),
        (5, 3, 3, 0),
        (9, 6, 7, 5),
        (1, 8, 288, 0),
        (0, 8, 8, 0),
    ],
)
def test_ids_are_distinct_within_a_token_and_balanced_over_the_batch(tokens, top_k, slots, offset):
    ids = torch.randint(0, 288, (tokens, top_k))
    out = balanced_slot_ids(ids, slots, offset)
    for row in out.tolist():
        assert len(set(row)) == len(row), row  # (a) a token never hits one slot twice
    assert out.min().item() >= 0 if out.numel() else True
    assert out.max().item() < slots if out.numel() else True
    counts = torch.bincount(out.flatten(), minlength=slots)
    assert counts.sum().item() == tokens * top_k
    assert counts.max().item() - counts.min().item() <= 1  # (b) every slot within one hit of the others


def test_padding_stays_and_balance_holds_for_the_real_hits():
    ids = torch.randint(0, 288, (64, 8))
    ids[10:20] = -1  # padded tokens
    ids[3, 5] = -1
    out = balanced_slot_ids(ids, 8)
    assert torch.equal(out < 0, ids < 0) and (out[ids < 0] == -1).all()
    counts = torch.bincount(out[out >= 0], minlength=8)
    assert counts.sum().item() == int((ids >= 0).sum())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_output_keeps_device_and_dtype_and_depends_on_the_shape_only(dtype):
    a = torch.randint(0, 288, (16, 8), dtype=dtype)
    b = torch.randint(0, 288, (16, 8), dtype=dtype)
    assert not torch.equal(a, b)
    out_a, out_b = balanced_slot_ids(a, 8), balanced_slot_ids(b, 8)
    assert out_a.dtype == dtype and out_a.device == a.device and out_a.shape == a.shape
    # a pure function of the shape (the router's choices are replaced, not remapped)
    assert torch.equal(out_a, out_b)


# ---- the routing wrapper -----------------------------------------------------------------------------------


class _Recording:
    """A stand-in real dispatcher: records what it is handed; has the attributes the engine reads."""

    TBO_OVERLAP = "comm_stream"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.graph_replay_state = object()

    @property
    def SYNC_FREE_DECODE(self) -> bool:  # noqa: N802 - a property, as DeepEP's
        return True

    def dispatch_start(self, hidden, topk_ids, topk_weights, *, is_prefill=None):
        self.calls.append(("dispatch_start", topk_ids.clone(), is_prefill))
        return "pending"

    def dispatch_finish(self, pending):
        self.calls.append(("dispatch_finish", pending))
        return "dispatched"

    def combine_start(self, expert_output, dispatched):
        self.calls.append(("combine_start", dispatched))
        return "combining"

    def combine_finish(self, pending):
        self.calls.append(("combine_finish", pending))
        return expert_output_marker


expert_output_marker = torch.zeros(1)


def test_wrapper_rewrites_ids_delegates_every_call_and_forwards_attributes():
    inner = _Recording()
    wrapper = EmulatedRoutingDispatcher(inner, num_slots=8, offset=4)
    ids = torch.randint(0, 288, (3, 4))
    assert wrapper.dispatch_start(torch.zeros(3, 2), ids, torch.ones(3, 4), is_prefill=True) == "pending"
    assert wrapper.dispatch_finish("pending") == "dispatched"
    assert wrapper.combine_start(torch.zeros(12, 2), "dispatched") == "combining"
    assert wrapper.combine_finish("combining") is expert_output_marker
    name, sent, is_prefill = inner.calls[0]
    assert name == "dispatch_start" and is_prefill is True
    assert torch.equal(sent, balanced_slot_ids(ids, 8, 4))
    assert [c[0] for c in inner.calls[1:]] == ["dispatch_finish", "combine_start", "combine_finish"]
    assert wrapper.TBO_OVERLAP == "comm_stream" and wrapper.SYNC_FREE_DECODE is True
    assert wrapper.graph_replay_state is inner.graph_replay_state
    assert getattr(wrapper, "pool", None) is None  # what the real one lacks, the wrapper lacks too


def test_factory_wraps_the_real_dispatcher_over_the_group_slots_with_a_rank_offset():
    built = []

    def make(backend, group, num_experts, **options):
        built.append((backend, group, num_experts, options))
        return LocalDispatcher(num_experts)

    dispatcher = emulated_routing(make, rank=1, world_size=2)("a2a", "group", 8, top_k=2)
    assert built == [("a2a", "group", 8, {"top_k": 2})]
    assert isinstance(dispatcher, EmulatedRoutingDispatcher) and isinstance(dispatcher.inner, LocalDispatcher)
    assert (dispatcher.num_slots, dispatcher.offset) == (8, 4)
    assert dispatcher.TBO_OVERLAP == "none"  # LocalDispatcher's, forwarded


# ---- shapes and refusals ------------------------------------------------------------------------------------


def test_shape_on_two_gpus_counts_group_slots_and_remote_shares():
    shape = EmulatedShape(72, 256, 32, 8, 256, world_size=2)
    assert (shape.experts_per_gpu, shape.group_slots, shape.rows_per_gpu) == (4, 8, 2048)
    assert shape.remote_share == 0.5 and shape.deployment_remote_share == 71 / 72


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            dict(ep_size=4, num_experts=8, world_size=8),
            r"--nproc-per-node \(8\) must be <= --emulate-ep \(4\)",
        ),
        # 256 slots over EP256: 1 per GPU; top-8 needs 8 GPUs
        (dict(ep_size=256, num_experts=256, world_size=2), r"use --nproc-per-node >= 8"),
        (dict(ep_size=4, num_experts=8, world_size=0), r"--nproc-per-node \(0\) must be >= 1"),
    ],
)
def test_shape_refusals_name_the_flags(shape, message):
    top_k = 8 if shape["num_experts"] == 256 else 2
    with pytest.raises(ValueError, match=message):
        EmulatedShape(shape["ep_size"], shape["num_experts"], 0, top_k, 16, world_size=shape["world_size"])


def test_one_gpu_keeps_repeated_experts_allowed():
    # W = 1 (EmulatedEPDispatcher, slot mod L) needs no K distinct slots: 1 expert per GPU at top-8 is fine
    assert EmulatedShape(256, 256, 0, 8, 16).experts_per_gpu == 1


def test_skew_is_refused_on_several_gpus_only():
    options = _tiny(emulate_ep=4, routing_skew="zipf:1.2")
    assert emulated_shape(options, 1).world_size == 1
    with pytest.raises(ValueError, match="drop --routing-skew"):
        emulated_shape(options, 2)


def test_shape_line_on_two_gpus():
    line = emulated_shape_line(_tiny(emulate_ep=4), 2)
    assert line.startswith("EP4 emulated on 2 GPUs: 2 experts per GPU (8 physical / 4), 4 x top-2 = 8 rows")
    assert "remote share 50% vs 75% at EP4" in line
    ds = BenchOptions(
        preset="deepseek-v3", num_layers=2, batch_size=256, emulate_ep=72, num_redundant_experts=32
    )
    assert "remote share 50% vs 98.6% at EP72" in emulated_shape_line(ds, 2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--preset", "tiny-deepseek", "--emulate-ep", "2", "--nproc-per-node", "4"],
            "must be <= --emulate-ep (2)",
        ),
        (
            ["--preset", "deepseek-v3", "--emulate-ep", "256", "--nproc-per-node", "2"],
            "use --nproc-per-node >= 8",
        ),
    ],
)
def test_cli_refuses_before_spawning(capsys, extra, message):
    assert main(["bench", "--device", "cpu", "--mode", "decode", *extra]) == 2
    assert message in capsys.readouterr().err


# ---- received rows ------------------------------------------------------------------------------------------


def test_received_rows_count_every_hit_on_one_rank():
    from moefleet.engine import topology
    from moefleet.engine.bench.emulate import install_emulated_dispatchers
    from moefleet.engine.bench.presets import preset_config
    from moefleet.engine.loader import build_model

    config = preset_config("tiny-deepseek", num_layers=2)  # 8 experts, top-2
    with topology.use(topology.Topology.for_rank(0, 4)):  # 2 per GPU
        model = build_model(config, torch.device("cpu"), "float32")
    install_emulated_dispatchers(model)
    tokens = 5
    hidden = torch.randn(tokens, int(config["hidden_size"]))
    mlps = [m for m in model.modules() if hasattr(m, "dispatchers")]
    before = [(m.dispatcher, m.dispatchers) for m in mlps]
    with torch.inference_mode():
        received = count_received_rows(model, lambda: [m(hidden) for m in mlps])
    assert received.moe_layers == 2 and len(received.per_slot) == 2
    assert sum(received.per_slot) == 2 * tokens * 2 and received.per_layer == tokens * 2
    assert [(m.dispatcher, m.dispatchers) for m in mlps] == before  # put back


# ---- 2 ranks over gloo ------------------------------------------------------------------------------------------


def _tiny(**overrides) -> BenchOptions:
    base = dict(
        preset="tiny-deepseek", num_layers=2, mode="decode", batch_size=4, kv_len=40, steps=2, warmup=1,
        device="cpu", dtype="float32", block_size=16,
    )  # fmt: skip
    return BenchOptions(**{**base, **overrides})


@pytest.mark.multiprocess
@pytest.mark.parametrize("tbo", ["off", "on"])
def test_two_ranks_emulate_ep4_with_real_dispatch(tbo):
    """EP4 on 2 gloo ranks (tiny-deepseek: 8 experts -> 2 per GPU, group slots 4, top-2): each rank holds 2
    experts, every slot of both ranks receives rows, every hit of the group is computed exactly once."""
    options = _tiny(emulate_ep=4, backend="a2a", tbo=tbo, breakdown=tbo == "off")
    ranks = run_options(options, 2)
    shape = emulated_shape(options, 2)
    moe_layers, micro_batches = 2, 2 if tbo == "on" else 1
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert (r["world_size"], r["emulated_ep"], r["experts_per_gpu"]) == (2, 4, shape.experts_per_gpu)
        assert len(r["received_rows_per_slot"]) == shape.experts_per_gpu
        assert min(r["received_rows_per_slot"]) > 0, r["received_rows_per_slot"]
        # balanced: each sender's micro-batch puts floor or ceil of its hits on every slot
        spread = max(r["received_rows_per_slot"]) - min(r["received_rows_per_slot"])
        assert spread <= 2 * micro_batches * moe_layers
    group_hits = 2 * shape.tokens_per_gpu * shape.top_k * moe_layers
    assert sum(sum(r["received_rows_per_slot"]) for r in ranks) == group_hits
    if tbo == "off":
        assert ranks[0]["breakdown_s"]["dispatch"] > 0  # the real a2a dispatch was timed
    row = summarize(asdict(options), ranks)
    assert (row["gpus"], row["emulated_ep"], row["experts_per_gpu"]) == (2, 4, 2)
    assert row["received_rows_per_layer"] >= shape.rows_per_gpu  # the busiest GPU: at least the mean


@pytest.mark.multiprocess
def test_two_rank_cli_prints_the_group_shape(capsys, tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "bench", "--preset", "tiny-deepseek", "--layers", "2", "--device", "cpu", "--dtype", "float32", "--mode", "prefill",
        "--prefill-tokens", "32", "--prefill-seq-len", "16", "--steps", "1", "--warmup", "1", "--block-size", "16",
        "--no-breakdown", "--emulate-ep", "8", "--nproc-per-node", "2", "--moe-backend", "a2a", "--tbo", "on",
        "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "EP8 emulated on 2 GPUs: 1 experts per GPU (8 physical / 8)" in printed
    assert "| 2 (as EP8) |" in printed
    import json

    ranks = json.loads(out.read_text())[0]["ranks"]
    # 32 tokens x top-2 per rank over 2 slots: 32 rows per slot per sender per layer, 2 senders, 2 MoE layers
    assert [r["received_rows_per_slot"] for r in ranks] == [[128], [128]]
