"""A two-batch-overlap step's per-stage timeline: when each micro-batch's compute and communication stages ran
on the GPU, and how much communication the other micro-batch's compute hid.

`StageTimer` is the recording seam: `tbo_streams.Overlap` calls `start(stream)` right before a stage's work is
issued on the stream that runs it (after the waits that order it) and `stop(...)` right after, so a span is the
stage's own GPU time on its stream (`CudaStageTimer`: timing events; `WallStageTimer` on CPU). The analysis is pure (`Span` lists in, numbers and text out), unit-tested on CPU:

  overlap_summary   step span, busy time per lane, communication time and the part of it that overlapped the
                    other micro-batch's compute ("hidden"), the compute lane's idle time
  stage_table       one markdown row per stage (micro-batch, kind, index, start, end, duration)
  ascii_timeline    one text lane per micro-batch and kind ('#' busy), the picture of the interleaving

Eager only: a decode step replayed from a CUDA graph is timed from a profiler trace instead (trace_timeline.py,
which shares the interval helpers `union`, `length`, `intersection` and `paint`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .tbo_streams import COMM, COMPUTE


@dataclass(frozen=True)
class Span:
    micro_batch: int
    kind: str  # COMPUTE or COMM
    index: int  # stage number within its micro-batch
    start_ms: float
    end_ms: float

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms


class StageTimer(Protocol):
    def start(self, stream: Any) -> Any:
        """A token marking "the stage's work starts here" on `stream` (None: the current stream)."""
        ...

    def stop(self, token: Any, stream: Any, micro_batch: int, kind: str) -> None:
        """The stage issued on `stream` ends here."""
        ...


def _spans(marks: list[tuple[int, str, Any, Any]], elapsed_ms: Callable[[Any, Any], float]) -> list[Span]:
    """(micro-batch, kind, start mark, end mark) in launch order -> spans, ms from the first start mark
    (`elapsed_ms(a, b)`: ms from mark a to mark b); each micro-batch's stages numbered in order."""
    if not marks:
        return []
    origin = marks[0][2]
    counts: dict[int, int] = {}
    spans = []
    for micro_batch, kind, start, end in marks:
        index = counts.get(micro_batch, 0)
        counts[micro_batch] = index + 1
        spans.append(Span(micro_batch, kind, index, elapsed_ms(origin, start), elapsed_ms(origin, end)))
    return spans


class WallStageTimer:
    """Host wall-clock marks (CPU: every op has finished when it returns, so wall time is the stage's time)."""

    def __init__(self) -> None:
        self._marks: list[tuple[int, str, float, float]] = []

    def start(self, stream: Any) -> Any:
        return time.perf_counter()

    def stop(self, token: Any, stream: Any, micro_batch: int, kind: str) -> None:
        self._marks.append((micro_batch, kind, token, time.perf_counter()))

    def spans(self) -> list[Span]:
        return _spans(self._marks, lambda a, b: (b - a) * 1e3)


class CudaStageTimer:
    """Timing events on the stage's stream; `spans()` after the step's work finished (it synchronises)."""

    def __init__(self) -> None:
        self._marks: list[tuple[int, str, Any, Any]] = []

    @staticmethod
    def _record(stream: Any) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def start(self, stream: Any) -> Any:
        return self._record(stream)

    def stop(self, token: Any, stream: Any, micro_batch: int, kind: str) -> None:
        self._marks.append((micro_batch, kind, token, self._record(stream)))

    def spans(self) -> list[Span]:
        if self._marks:
            torch.cuda.synchronize()
        return _spans(self._marks, lambda a, b: a.elapsed_time(b))  # spans may start before the first: fine


def stage_timer(device: torch.device) -> CudaStageTimer | WallStageTimer:
    return CudaStageTimer() if device.type == "cuda" else WallStageTimer()


# ---- pure analysis ---------------------------------------------------------------------------------------


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted and merged: overlapping or touching intervals become one (also used by trace_timeline.py)."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(union a) & (union b) as sorted, disjoint intervals."""
    out: list[tuple[float, float]] = []
    i, j = 0, 0
    a, b = union(a), union(b)
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def intersection_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of (union a) & (union b)."""
    return length(intersection(a, b))


def overlap_summary(spans: list[Span]) -> dict[str, float]:
    """Step span, busy time of the compute and comm lanes, communication time and how much of it ran while
    the OTHER micro-batch computed (hidden), all in ms; `hidden_share` = hidden / comm."""
    if not spans:
        return dict.fromkeys(
            ("step_ms", "compute_ms", "compute_idle_ms", "comm_ms", "hidden_ms", "hidden_share"), 0.0
        )
    step = max(s.end_ms for s in spans) - min(s.start_ms for s in spans)
    lanes = {
        (mb, kind): [(s.start_ms, s.end_ms) for s in spans if s.micro_batch == mb and s.kind == kind]
        for mb in {s.micro_batch for s in spans}
        for kind in (COMPUTE, COMM)
    }
    compute = union([iv for (_, kind), ivs in lanes.items() if kind == COMPUTE for iv in ivs])
    comm_total = sum(length(union(ivs)) for (_, kind), ivs in lanes.items() if kind == COMM)
    hidden = sum(
        intersection_length(
            ivs, [iv for (other, k), o in lanes.items() if k == COMPUTE and other != mb for iv in o]
        )
        for (mb, kind), ivs in lanes.items()
        if kind == COMM
    )
    return {
        "step_ms": step,
        "compute_ms": length(compute),
        "compute_idle_ms": step - length(compute),
        "comm_ms": comm_total,
        "hidden_ms": hidden,
        "hidden_share": hidden / comm_total if comm_total else 0.0,
    }


def stage_table(spans: list[Span], limit: int = 40) -> str:
    """Markdown: one row per stage in start order (the first `limit`)."""
    rows = ["| mb | kind | stage | start ms | end ms | ms |", "|---|---|---|---|---|---|"]
    for s in sorted(spans, key=lambda s: s.start_ms)[:limit]:
        rows.append(
            f"| {s.micro_batch} | {s.kind} | {s.index} | {s.start_ms:.3f} | {s.end_ms:.3f} | {s.ms:.3f} |"
        )
    if len(spans) > limit:
        rows.append(f"| ... | {len(spans) - limit} more | | | | |")
    return "\n".join(rows)


def paint(lane: list[str], start: float, end: float, char: str = "#") -> None:
    """Mark [start, end) (fractions of the chart's span) in a text lane; at least one column."""
    width = len(lane)
    lo = int(start * width)
    for col in range(lo, min(max(lo + 1, int(end * width)), width)):
        lane[col] = char


def ascii_timeline(spans: list[Span], width: int = 100) -> str:
    """One lane per (micro-batch, kind); '#' where a stage of that lane ran, '.' elsewhere."""
    if not spans:
        return ""
    origin = min(s.start_ms for s in spans)
    step = max(s.end_ms for s in spans) - origin or 1.0
    lines = []
    for mb in sorted({s.micro_batch for s in spans}):
        for kind in (COMPUTE, COMM):
            lane = ["."] * width
            for s in spans:
                if s.micro_batch == mb and s.kind == kind:
                    paint(lane, (s.start_ms - origin) / step, (s.end_ms - origin) / step)
            lines.append(f"mb{mb} {kind:<7} |{''.join(lane)}|")
    lines.append(f"{'':<12} 0{'':>{width - 8}}{step:.2f} ms")
    return "\n".join(lines)
