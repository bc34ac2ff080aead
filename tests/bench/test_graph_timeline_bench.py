"""`moefleet bench --tbo-timeline` with decode CUDA graphs, the parts that run without a GPU: the profiled steps'
trace (one record_function window per step, the export read back), the printed graph timeline from a trace in
torch.profiler's layout, a profiler failure leaving the run's numbers alone, and the JSON row's fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moefleet.engine.bench import kernel_profile, runner
from moefleet.engine.bench.report import graph_timeline_fields
from moefleet.engine.trace_timeline import STEP_MARK, kernel_events, step_windows

FIXTURE = Path(__file__).parents[1] / "engine" / "data" / "graph_replay_trace.json"


def test_step_trace_marks_one_window_per_step(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    ran: list[int] = []
    barriers: list[int] = []

    def run_step(batch):
        ran.append(batch)
        torch.ones(64).sum()

    trace = kernel_profile.step_trace(run_step, [1, 2], "cpu", lambda: barriers.append(1), gap_s=0.0)
    assert ran == [1, 2] and barriers == [1, 1]
    windows = step_windows(trace)
    assert len(windows) == 2 and all(hi > lo for lo, hi in windows) and windows[0][1] <= windows[1][0]
    assert kernel_events(trace) == []  # no GPU here
    assert STEP_MARK == "moefleet.graph_step"


def test_graph_timeline_steps_prints_the_replays_timeline_on_rank_0(monkeypatch, capsys):
    trace = json.loads(FIXTURE.read_text())
    monkeypatch.setattr(kernel_profile, "step_trace", lambda *args, **kwargs: trace)
    got = runner.graph_timeline_steps(lambda b: None, [0, 1], "cuda", lambda: None, 0, asked_comm_us=100.0)
    assert got["steps"] == 2 and got["hidden_share"] == pytest.approx(0.6)
    err = capsys.readouterr().err
    assert err.startswith("rank 0: TBO timeline, graph replays, 2 profiled steps: step 0.25 ms on the GPU")
    assert "(asked 0.10 ms)" in err and "comm hidden" in err
    runner.graph_timeline_steps(lambda b: None, [0, 1], "cuda", lambda: None, 1)
    assert capsys.readouterr().err == ""  # rank 1 computes, rank 0 prints


def test_eager_steps_get_their_label_and_the_trace_is_written(monkeypatch, capsys, tmp_path):
    import gzip

    trace = json.loads(FIXTURE.read_text())
    monkeypatch.setattr(kernel_profile, "step_trace", lambda *args, **kwargs: trace)
    out = tmp_path / "steps.json.gz"
    runner.graph_timeline_steps(
        lambda b: None, [0, 1], "cuda", lambda: None, 0, label="eager steps", trace_out=str(out)
    )
    assert capsys.readouterr().err.startswith("rank 0: TBO timeline, eager steps, 2 profiled steps:")
    with gzip.open(out, "rt") as f:
        assert json.load(f) == trace


def test_trace_out_needs_the_timeline():
    with pytest.raises(ValueError, match="add --tbo-timeline"):
        runner.BenchOptions(trace_out="/tmp/x.json")


def test_a_failed_profile_skips_the_graph_timeline_only(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(kernel_profile, "step_trace", broken)
    assert runner.graph_timeline_steps(lambda b: None, [0], "cuda", lambda: None, 0) == {}
    assert "graph timeline skipped: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED" in capsys.readouterr().err


def test_the_json_row_carries_the_graph_timeline_numbers():
    timeline = {"span_us": 6200.0, "hidden_share": 0.75, "comm_kernel_sum_us": 1210.0}
    assert graph_timeline_fields(timeline) == {
        "graph_step_ms_profiled": 6.2,
        "graph_comm_hidden_pct": 75.0,
        "graph_comm_kernel_ms": 1.21,
    }
    assert graph_timeline_fields({}) == dict.fromkeys(
        ("graph_step_ms_profiled", "graph_comm_hidden_pct", "graph_comm_kernel_ms")
    )
