"""The TBO per-stage timeline (engine/tbo_timeline.py): the pure analysis on hand-made spans, and the timer
hooks in `tbo_streams` (every stage marked on the stream that runs it, after the waits that order it) with the
recording fake of the stream API and the tiny model running for real."""

from __future__ import annotations

import pytest
import torch
from moefleet.engine import LLM
from moefleet.engine.tbo import forward_tbo
from moefleet.engine.tbo_streams import StreamOverlap
from moefleet.engine.tbo_timeline import (
    COMM,
    COMPUTE,
    Span,
    WallStageTimer,
    ascii_timeline,
    overlap_summary,
    stage_table,
)
from support.fake_streams import FakeStreams
from support.forward_batches import three_prompts
from support.tiny_models import tiny_model_dir

pytestmark = pytest.mark.timeout(300)


def test_summary_counts_only_comm_under_the_other_micro_batchs_compute():
    spans = [
        Span(0, COMPUTE, 0, 0.0, 2.0),
        Span(1, COMM, 0, 1.0, 3.0),  # 1 ms under mb0's compute
        Span(0, COMM, 1, 2.0, 4.0),  # 1 ms under mb1's compute [3, 5]
        Span(1, COMPUTE, 1, 3.0, 5.0),
        Span(1, COMM, 2, 4.5, 5.0),  # under its OWN compute only: not hidden
    ]
    got = overlap_summary(spans)
    assert got["step_ms"] == 5.0
    assert got["compute_ms"] == 4.0 and got["compute_idle_ms"] == 1.0
    assert got["comm_ms"] == pytest.approx(4.5)
    assert got["hidden_ms"] == pytest.approx(2.0)
    assert got["hidden_share"] == pytest.approx(2.0 / 4.5)
    assert overlap_summary([])["hidden_share"] == 0.0


def test_overlapping_spans_of_one_lane_count_once():
    spans = [Span(0, COMM, 0, 0.0, 2.0), Span(0, COMM, 1, 1.0, 3.0), Span(1, COMPUTE, 0, 0.0, 10.0)]
    got = overlap_summary(spans)
    assert got["comm_ms"] == 3.0 and got["hidden_ms"] == 3.0


def test_table_and_text_timeline():
    spans = [Span(0, COMPUTE, 0, 0.0, 5.0), Span(1, COMM, 0, 5.0, 10.0)]
    lanes = ascii_timeline(spans, width=10).splitlines()
    assert lanes[0] == "mb0 compute |#####.....|"
    assert lanes[1] == "mb0 comm    |..........|"
    assert lanes[3] == "mb1 comm    |.....#####|"
    table = stage_table(spans * 3, limit=4).splitlines()
    assert len(table) == 2 + 4 + 1 and "2 more" in table[-1]


class RecordingTimer:
    """Marks as (start|stop, stream, micro-batch, kind) in the fake streams' log, so each mark's place among
    the waits and launches is checked."""

    def __init__(self, log: list):
        self.log = log

    def start(self, stream):
        self.log.append(("start", stream))
        return len(self.log)

    def stop(self, token, stream, micro_batch, kind):
        self.log.append(("stop", stream, micro_batch, kind, token))


def test_every_stage_is_marked_on_its_stream_after_its_waits():
    llm = LLM(tiny_model_dir("qwen3_norm_topk"), dtype="float32", max_model_len=64)
    model, runner = llm.engine.model_runner.model, llm.engine.model_runner
    log: list = []
    with torch.inference_mode():
        forward_tbo(
            model, three_prompts(runner), overlap=StreamOverlap(FakeStreams(log)), timer=RecordingTimer(log)
        )
    stops = [e for e in log if e[0] == "stop"]
    layers = len(model.model.layers)
    # per micro-batch and layer: attention (compute), dispatch (comm), experts (compute) with the diverted
    # combine launch (comm) inside it, combine (comm)
    for m in (0, 1):
        kinds = [e[3] for e in stops if e[2] == m]
        assert kinds == [COMPUTE, COMM, COMM, COMPUTE, COMM] * layers
    for j, e in enumerate(log):
        if e[0] != "stop":
            continue
        stream, start = e[1], e[4] - 1
        assert stream == ("comm" if e[3] == COMM else "compute")  # marked on the stream that ran the stage
        assert log[start] == ("start", stream)
        # the waits that order the stage come before its start mark, none between start and stop
        assert not [w for w in log[start:j] if w[0] == "wait" and w[1] == stream]


def test_wall_timer_spans_on_cpu():
    llm = LLM(tiny_model_dir("qwen3_norm_topk"), dtype="float32", max_model_len=64)
    model, runner = llm.engine.model_runner.model, llm.engine.model_runner
    timer = WallStageTimer()
    with torch.inference_mode():
        forward_tbo(model, three_prompts(runner), timer=timer)
    spans = timer.spans()
    layers = len(model.model.layers)
    assert (
        len(spans) == 2 * 4 * layers
    )  # one-stream CPU path: the four stages of each layer, both micro-batches
    assert all(s.end_ms >= s.start_ms >= 0 for s in spans)
    assert {s.index for s in spans if s.micro_batch == 1} == set(range(4 * layers))
    got = overlap_summary(spans)
    assert got["hidden_ms"] == pytest.approx(0.0, abs=1e-9)  # one stream: nothing overlaps
    assert 0 < got["compute_ms"] <= got["step_ms"]
