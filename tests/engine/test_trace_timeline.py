"""The graph-replay timeline (engine/trace_timeline.py) on hand-made kernel events and a Chrome-trace fixture in
the layout torch.profiler exports: merged busy time per stream, the comm kernels' hidden share, step splitting
by windows and by gaps, which kernels count as communication, and the text chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moefleet.engine.trace_timeline import (
    KernelEvent,
    choose_comm,
    format_graph_timeline,
    graph_timeline,
    kernel_events,
    split_steps,
    step_summary,
    step_windows,
    stream_chart,
)

FIXTURE = Path(__file__).with_name("data") / "graph_replay_trace.json"


def k(name: str, stream: int, start: float, dur: float) -> KernelEvent:
    return KernelEvent(name, stream, start, dur)


# One step: compute on stream 7 with a gap [40, 50) and two kernels overlapping on one stream ([0, 30) and
# [20, 40): 40 us, not 50), comm waits on stream 20 at [25, 45) (hidden 15 of 20: no compute in [40, 45)) and
# [60, 100) (hidden 20 of 40: compute ends at 80), a copy on stream 9 at [100, 110); nothing ran in [45, 50).
STEP = [
    k("attention", 7, 0.0, 30.0),
    k("rms_norm", 7, 20.0, 20.0),
    k("gpu_wait_kernel", 20, 25.0, 20.0),
    k("experts", 7, 50.0, 30.0),
    k("gpu_wait_kernel", 20, 60.0, 40.0),
    k("Memcpy DtoH (Device -> Pinned)", 9, 100.0, 10.0),
]


def is_wait(e: KernelEvent) -> bool:
    return e.name == "gpu_wait_kernel"


def test_one_step_busy_per_stream_merges_overlapping_kernels_and_counts_hidden_comm():
    got = step_summary(STEP, is_wait)
    assert got["span_us"] == 110.0
    assert got["stream_busy_us"] == {7: 70.0, 9: 10.0, 20: 60.0}  # stream 7: [0, 40) + [50, 80)
    assert got["compute_us"] == 80.0  # streams 7 and 9
    assert got["comm_us"] == 60.0
    assert got["hidden_us"] == 35.0  # [25, 40) + [60, 80)
    assert got["busy_us"] == 105.0 and got["idle_us"] == 5.0
    assert (got["comm_kernels"], got["comm_kernel_sum_us"]) == (2, 60.0)


def test_overlapping_comm_kernels_count_once_but_sum_in_full():
    events = [k("gpu_wait_kernel", 3, 0.0, 10.0), k("gpu_wait_kernel", 4, 5.0, 10.0), k("gemm", 7, 0.0, 4.0)]
    got = step_summary(events, is_wait)
    assert (got["comm_us"], got["comm_kernel_sum_us"], got["hidden_us"]) == (15.0, 20.0, 4.0)
    assert got["idle_us"] == 0.0 and got["span_us"] == 15.0


def test_idle_time_is_where_no_stream_ran():
    got = step_summary([k("a", 7, 0.0, 10.0), k("b", 7, 30.0, 10.0)], is_wait)
    assert (got["span_us"], got["busy_us"], got["idle_us"], got["comm_us"]) == (40.0, 20.0, 20.0, 0.0)
    assert step_summary([], is_wait)["span_us"] == 0.0


def shifted(events: list[KernelEvent], by: float) -> list[KernelEvent]:
    return [k(e.name, e.stream, e.start_us + by, e.dur_us) for e in events]


def test_steps_split_by_their_windows_and_averaged():
    second = shifted(STEP, 1000.0)[:-1] + [k("Memcpy DtoH", 9, 1100.0, 30.0)]  # a 130 us step
    stray = [k("ncclDevKernel_barrier", 30, 500.0, 5.0)]  # between the windows: left out
    events = sorted(STEP + stray + second, key=lambda e: e.start_us)
    windows = [(-5.0, 200.0), (990.0, 1200.0)]
    groups = split_steps(events, windows)
    assert [len(g) for g in groups] == [6, 6]
    got = graph_timeline(events, windows, comm_stream=None, width=20)
    assert got["steps"] == 2
    assert got["step_spans_us"] == [110.0, 130.0]
    assert got["span_us"] == 120.0
    assert got["comm_us"] == 60.0 and got["hidden_us"] == 35.0
    assert got["hidden_share"] == pytest.approx(35.0 / 60.0)
    assert got["stream_busy_us"] == {7: 70.0, 9: 20.0, 20: 60.0}
    assert got["comm_by"] == "by name (gpu_wait_kernel)"
    assert got["idle_us"] == 5.0 and got["busy_us"] == 115.0 and got["compute_us"] == 90.0
    assert got["chart"] == stream_chart(STEP, is_wait, 20)  # the lower median of two spans: the 110 us step


def test_without_windows_steps_split_at_the_widest_gaps():
    events = STEP + shifted(STEP, 500.0) + shifted(STEP, 800.0)
    groups = split_steps(events, steps=3)
    assert [len(g) for g in groups] == [6, 6, 6]
    assert [g[0].start_us for g in groups] == [0.0, 500.0, 800.0]
    assert split_steps(events, steps=1) == [events]
    assert len(split_steps(events, steps=10)) == 3 + 3  # fewer gaps than asked: every busy stretch, no more
    assert split_steps([], steps=3) == []
    assert graph_timeline(events, steps=3)["split_by"] == "gaps"
    misaligned = graph_timeline(events, windows=[(5000.0, 6000.0)], steps=3)  # no event inside: the gaps
    assert misaligned["split_by"] == "gaps" and misaligned["steps"] == 3 and misaligned["span_us"] == 110.0
    with pytest.raises(ValueError, match="steps"):
        split_steps(events, steps=0)


def test_comm_by_stream_name_or_fewest_kernels():
    by_stream, how = choose_comm(STEP, comm_stream=9)
    assert [e.stream for e in STEP if by_stream(e)] == [9] and how == "stream 9 (given)"
    by_name, how = choose_comm(STEP)
    assert [e.stream for e in STEP if by_name(e)] == [20, 20] and how == "by name (gpu_wait_kernel)"
    anonymous = [
        k("a", 7, 0, 1),
        k("b", 7, 1, 1),
        k("c", 7, 2, 1),
        k("x", 13, 0, 1),
        k("y", 13, 1, 1),
        k("z", 11, 0, 1),
    ]
    fewest, how = choose_comm(anonymous)
    assert [e.name for e in anonymous if fewest(e)] == ["z"] and how.startswith("stream 11 (fewest kernels")
    none, how = choose_comm(anonymous[:3])
    assert not any(none(e) for e in anonymous) and how.startswith("none")
    spin, _ = choose_comm([k("at::cuda::(anonymous namespace)::spin_kernel(long)", 7, 0, 1)])
    assert spin(k("at::cuda::(anonymous namespace)::spin_kernel(long)", 7, 0, 1))


def test_chart_rows_per_stream_then_compute_comm_and_hidden():
    lines = stream_chart(STEP, is_wait, width=11).splitlines()
    assert lines == [
        "stream 7       |####.###...|",
        "stream 9       |..........#|",
        "stream 20      |..~~..~~~~.|",
        "compute        |####.###..#|",
        "comm           |..~~..~~~~.|",
        "comm hidden    |..^^..^^...|",
        " " * 16 + "0   0.11 ms",
    ]
    many = [k("g", s, float(s), 1.0) for s in range(12)]
    rows = stream_chart(many, is_wait, width=12, streams=8).splitlines()
    assert rows[8].startswith("4 more ") and len(rows) == 8 + 1 + 3 + 1
    assert stream_chart([], is_wait) == ""


def test_reads_kernels_copies_and_step_windows_from_a_chrome_trace():
    trace = json.loads(FIXTURE.read_text())
    events = kernel_events(trace)
    assert [(e.name, e.stream) for e in events][:3] == [
        ("Memcpy HtoD (Pageable -> Device)", 7),
        ("void at::native::copy_kernel", 7),
        ("gpu_wait_kernel", 24),
    ]
    assert all(e.name != "cudaGraphLaunch" for e in events)  # host runtime calls are not GPU work
    assert step_windows(trace) == [(1000.0, 1400.0), (3000.0, 3400.0)]
    got = graph_timeline(events, step_windows(trace), steps=2)
    assert (
        got["steps"] == 2 and got["comm_by"] == "by name (gpu_wait_kernel)" and got["split_by"] == "windows"
    )
    assert got["comm_us"] == 100.0 and got["hidden_us"] == 60.0 and got["span_us"] == 250.0
    text = format_graph_timeline(got, asked_comm_us=100.0)
    assert "2 profiled steps: step 0.25 ms on the GPU" in text
    assert "comm 0.10 ms of which 0.06 ms (60%)" in text and "(asked 0.10 ms)" in text
    assert "stream 24" in text and text.endswith("0.25 ms")
    assert "busy ms per step by stream: 7: 0.06, 24: 0.05, 25: 0.04, 31: 0.05\n" in text
    many = {**got, "stream_busy_us": {s: 1000.0 * (s + 1) for s in range(10)}}
    assert (
        "by stream: 2: 3.00, 3: 4.00, 4: 5.00, 5: 6.00, 6: 7.00, 7: 8.00, 8: 9.00, 9: 10.00, 2 more: 3.00\n"
        in (format_graph_timeline(many))
    )


def test_no_events_no_steps():
    got = graph_timeline([], windows=[(0.0, 1.0)], steps=3)
    assert (got["steps"], got["span_us"], got["hidden_share"], got["chart"]) == (0, 0.0, 0.0, "")
    assert "0 profiled steps" in format_graph_timeline(got)
