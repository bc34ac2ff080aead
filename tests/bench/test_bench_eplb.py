"""`moefleet bench --routing-skew zipf:S --num-redundant-experts N --eplb`: the skew is Zipf, and a 2-rank run
rebalances (weights move, balancedness rises from the measured skew to near the planner's prediction)."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine.bench.command import run_options
from moefleet.engine.bench.report import eplb_summary, format_eplb_table
from moefleet.engine.bench.runner import BenchOptions
from moefleet.engine.eplb.bench import parse_skew, zipf_probs

pytestmark = pytest.mark.timeout(240)


def test_parse_skew():
    assert parse_skew("") == 0.0 and parse_skew("zipf:1.2") == 1.2
    for bad in ("zipf", "zipf:0", "zipf:x", "uniform:1"):
        with pytest.raises(ValueError, match="expected zipf:S"):
            parse_skew(bad)
    with pytest.raises(ValueError, match="routing-skew"):
        BenchOptions(routing_skew="zipf:-1")


def test_zipf_probs_follow_the_power_law():
    probs = zipf_probs(8, 1.0, seed=3)
    assert probs.sum().item() == pytest.approx(1.0)
    harmonic = sum(1 / r for r in range(1, 9))
    expected = sorted((1 / r / harmonic for r in range(1, 9)), reverse=True)
    assert sorted(probs.tolist(), reverse=True) == pytest.approx(expected)
    assert torch.equal(probs, zipf_probs(8, 1.0, seed=3))  # same on every rank


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_skewed_run_rebalances():
    options = BenchOptions(
        preset="tiny-deepseek", num_layers=3, dense_layers=1, batch_size=32, kv_len=16, steps=2, warmup=1,
        device="cpu", dtype="float32", block_size=16, breakdown=False, routing_skew="zipf:1.5",
        num_redundant_experts=4, eplb=True,
    )  # fmt: skip
    ranks = run_options(options, 2)
    summary = eplb_summary(ranks)
    assert summary is not None and summary["moved_experts"] > 0
    assert summary["balancedness_before"] < summary["predicted_balancedness"]
    assert summary["balancedness_after"] > summary["balancedness_before"]
    assert len(ranks[0]["eplb"]["pause_per_layer_ms"]) == 2  # the two MoE layers, one pause each
    row = {"preset": "tiny-deepseek", "gpus": 2, "mode": "decode", "eplb": summary}
    assert "tiny-deepseek | 2 | decode" in format_eplb_table([row])
