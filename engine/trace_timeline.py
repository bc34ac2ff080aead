"""The timeline of decode steps replayed from a CUDA graph, read from a torch.profiler trace: busy time per
stream, how much of the communication ran while other kernels ran ("hidden"), and a text chart.

`tbo_timeline.py` times one EAGER step stage by stage with CUDA events; an eager decode step is host-bound (its
kernels wait for their launches), so its overlap is not the overlap of the graph replays production runs. The
profiler (CUPTI) records every kernel of a replayed graph with its stream, start and duration; `kernel_events`
and `step_windows` read them from the exported Chrome trace (`prof.export_chrome_trace`: events of category
"kernel", "gpu_memcpy", "gpu_memset" with `args.stream`; the steps' `record_function` ranges, category
"user_annotation"). The rest is pure (events in, numbers and text out), unit-tested on CPU:

  split_steps     the events of each profiled step: by the steps' windows, else cut at the widest idle gaps
  choose_comm     which kernels are communication (below)
  step_summary    one step: span, busy time per stream (overlapping kernels of one stream count once), the
                  busy time of the comm kernels and of the others, and their overlap ("hidden")
  graph_timeline  the steps' summaries averaged (per step), with the chart of the median step
  stream_chart    one text row per stream ('#' other kernels, '~' comm kernels), then all compute, all comm and
                  where they overlap

Which kernels are communication: CUPTI reports a replayed graph's kernels on whatever streams the graph
executor placed them (often more streams than the capture used: pytorch/pytorch#152114), so the eager step's
comm stream has no fixed id in a graph's trace. `choose_comm`: a given `comm_stream`; else kernels named like a
transfer (`COMM_KERNELS`: the emulated transfer wait of gpu_wait.py, torch.cuda._sleep's spin kernel, NCCL,
DeepEP, NVSHMEM all-to-all, the nvlink dispatcher's copy kernels); else the stream with the fewest kernels other
than the one with the most (the compute stream). "Hidden" is comm time during which any other kernel ran.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .tbo_timeline import intersection, intersection_length, length, paint, union

STEP_MARK = "moefleet.graph_step"  # the record_function name of one profiled step (bench/kernel_profile.py)
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# Lower-case substrings of communication kernels' names (see the module doc).
COMM_KERNELS = (
    "gpu_wait_kernel",
    "spin_kernel",
    "nccl",
    "deep_ep",
    "all_to_all",
    "alltoall",
    "_dispatch_kernel",
    "_return_kernel",
)
Interval = tuple[float, float]


@dataclass(frozen=True, slots=True)
class KernelEvent:
    name: str
    stream: int
    start_us: float
    dur_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


# ---- reading a Chrome trace ---------------------------------------------------------------------------------


def kernel_events(trace: dict[str, Any]) -> list[KernelEvent]:
    """The GPU work (kernels, copies, memsets) of an exported torch.profiler Chrome trace, by start time."""
    events = []
    for e in trace.get("traceEvents", []):
        args = e.get("args") or {}
        if e.get("ph") == "X" and str(e.get("cat", "")).lower() in GPU_CATEGORIES and "stream" in args:
            events.append(
                KernelEvent(str(e["name"]), int(args["stream"]), float(e["ts"]), float(e.get("dur", 0.0)))
            )
    return sorted(events, key=lambda k: (k.start_us, k.stream))


def step_windows(trace: dict[str, Any], name: str = STEP_MARK) -> list[Interval]:
    """The host ranges of `record_function(name)` in the trace, in order (GPU timestamps are in the same clock:
    a window that ends after a device synchronisation holds its step's GPU work)."""
    return sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name") == name
    )


# ---- analysis (pure) ----------------------------------------------------------------------------------------


def split_steps(
    events: Sequence[KernelEvent], windows: Sequence[Interval] = (), steps: int = 1
) -> list[list[KernelEvent]]:
    """Each step's events: those starting inside its window (events outside every window are left out), or
    without windows the `steps` stretches between the `steps - 1` widest gaps in which no stream was busy."""
    if windows:
        inside = [[e for e in events if lo <= e.start_us < hi] for lo, hi in windows]
        return [g for g in inside if g]
    if steps < 1:
        raise ValueError(f"steps ({steps}) must be >= 1")
    busy = union([(e.start_us, e.end_us) for e in events])
    widest = sorted(range(len(busy) - 1), key=lambda i: (busy[i][1] - busy[i + 1][0], i))[: steps - 1]
    cuts = sorted(busy[i + 1][0] for i in widest)  # each cut: where a step's first busy stretch starts
    groups: list[list[KernelEvent]] = [[] for _ in range(len(cuts) + 1)] if events else []
    for e in events:
        groups[bisect.bisect_right(cuts, e.start_us)].append(e)
    return groups


def _named_comm(name: str, names: Sequence[str]) -> bool:
    lower = name.lower()
    return any(n in lower for n in names)


def choose_comm(
    events: Sequence[KernelEvent], comm_stream: int | None = None, names: Sequence[str] = COMM_KERNELS
) -> tuple[Callable[[KernelEvent], bool], str]:
    """(is this event communication?, how that was decided): `comm_stream`, else by name, else the stream with
    the fewest kernels besides the one with the most (the module doc says why)."""
    if comm_stream is not None:
        return (lambda e: e.stream == comm_stream), f"stream {comm_stream} (given)"
    matched = sorted({e.name for e in events if _named_comm(e.name, names)})
    if matched:
        shown = ", ".join(n[:40] for n in matched[:3]) + (f" +{len(matched) - 3}" if len(matched) > 3 else "")
        return (lambda e: _named_comm(e.name, names)), f"by name ({shown})"
    counts = Counter(e.stream for e in events)
    if len(counts) < 2:
        return (lambda e: False), "none (one stream, no kernel named like a transfer)"
    compute = min(counts, key=lambda s: (-counts[s], s))
    comm = min((s for s in counts if s != compute), key=lambda s: (counts[s], s))
    return (lambda e: e.stream == comm), f"stream {comm} (fewest kernels; stream {compute} has the most)"


def step_summary(events: Sequence[KernelEvent], is_comm: Callable[[KernelEvent], bool]) -> dict[str, Any]:
    """One step, in microseconds: span (first start to last end), busy (any stream) and idle, busy per stream,
    compute (non-comm kernels, any stream), comm, hidden (comm while compute ran), the comm kernels' count
    and summed durations."""
    comm = [(e.start_us, e.end_us) for e in events if is_comm(e)]
    compute = [(e.start_us, e.end_us) for e in events if not is_comm(e)]
    span = max(e.end_us for e in events) - min(e.start_us for e in events) if events else 0.0
    busy = length(union(comm + compute))
    return {
        "span_us": span,
        "busy_us": busy,
        "idle_us": span - busy,
        "stream_busy_us": stream_busy(events),
        "compute_us": length(union(compute)),
        "comm_us": length(union(comm)),
        "hidden_us": intersection_length(comm, compute),
        "comm_kernels": len(comm),
        "comm_kernel_sum_us": sum(end - start for start, end in comm),
    }


def stream_busy(events: Sequence[KernelEvent]) -> dict[int, float]:
    """Busy microseconds per stream (overlapping kernels of one stream counted once)."""
    streams = sorted({e.stream for e in events})
    return {s: length(union([(e.start_us, e.end_us) for e in events if e.stream == s])) for s in streams}


def busiest(busy: dict[int, float], count: int) -> list[int]:
    """The `count` busiest streams of `busy`, in stream order (ties: the lower stream id)."""
    return sorted(sorted(busy, key=lambda s: (-busy[s], s))[:count])


def stream_chart(
    events: Sequence[KernelEvent], is_comm: Callable[[KernelEvent], bool], width: int = 100, streams: int = 8
) -> str:
    """Rows: each stream ('#' a kernel, '~' a comm kernel; the `streams` busiest, the rest in one row), then all
    compute, all comm, and '^' where comm ran while compute ran; the span in ms under them."""
    if not events:
        return ""
    origin = min(e.start_us for e in events)
    span = max(e.end_us for e in events) - origin or 1.0
    busy = stream_busy(events)
    shown = busiest(busy, streams)

    def row(label: str, intervals: Sequence[tuple[float, float, str]]) -> str:
        lane = ["."] * width
        for lo, hi, char in sorted(intervals, key=lambda iv: iv[2] == "~"):  # comm drawn last: stays visible
            paint(lane, (lo - origin) / span, (hi - origin) / span, char)
        return f"{label:<14} |{''.join(lane)}|"

    def marked(selected: Sequence[KernelEvent]) -> list[tuple[float, float, str]]:
        return [(e.start_us, e.end_us, "~" if is_comm(e) else "#") for e in selected]

    lines = [row(f"stream {s}", marked([e for e in events if e.stream == s])) for s in shown]
    if len(busy) > len(shown):
        lines.append(
            row(f"{len(busy) - len(shown)} more", marked([e for e in events if e.stream not in shown]))
        )
    compute = [(e.start_us, e.end_us) for e in events if not is_comm(e)]
    comm = [(e.start_us, e.end_us) for e in events if is_comm(e)]
    lines.append(row("compute", [(lo, hi, "#") for lo, hi in compute]))
    lines.append(row("comm", [(lo, hi, "~") for lo, hi in comm]))
    lines.append(row("comm hidden", [(lo, hi, "^") for lo, hi in intersection(comm, compute)]))
    lines.append(f"{'':<15} 0{'':>{width - 8}}{span / 1e3:.2f} ms")
    return "\n".join(lines)


def graph_timeline(
    events: Sequence[KernelEvent],
    windows: Sequence[Interval] = (),
    steps: int = 1,
    comm_stream: int | None = None,
    names: Sequence[str] = COMM_KERNELS,
    width: int = 100,
) -> dict[str, Any]:
    """The profiled steps (`split_steps`) summarised: per-step means of `step_summary`'s numbers (a stream
    absent from a step counts 0 there), `hidden_share` = hidden / comm over all steps, each step's span, how
    the steps were split and comm chosen, and the chart of the median-span step (the lower median of an even
    count). Windows that hold no event (host and GPU clocks not aligned) fall back to the gaps."""
    groups = split_steps(events, windows, steps)
    split_by = "windows" if windows and groups else "gaps"
    if windows and not groups:
        groups = split_steps(events, (), steps)
    is_comm, comm_by = choose_comm([e for g in groups for e in g], comm_stream, names)
    per_step = [step_summary(g, is_comm) for g in groups]
    n = len(per_step) or 1
    keys = ("span_us", "busy_us", "idle_us", "compute_us", "comm_us", "hidden_us", "comm_kernel_sum_us")
    out: dict[str, Any] = {k: sum(s[k] for s in per_step) / n for k in keys}
    comm = sum(s["comm_us"] for s in per_step)
    streams = sorted({st for s in per_step for st in s["stream_busy_us"]})
    by_span = sorted(range(len(per_step)), key=lambda i: (per_step[i]["span_us"], i))
    out.update(
        steps=len(per_step),
        split_by=split_by,
        comm_by=comm_by,
        comm_kernels=sum(s["comm_kernels"] for s in per_step) / n,
        hidden_share=sum(s["hidden_us"] for s in per_step) / comm if comm else 0.0,
        stream_busy_us={st: sum(s["stream_busy_us"].get(st, 0.0) for s in per_step) / n for st in streams},
        step_spans_us=[s["span_us"] for s in per_step],
        chart=stream_chart(groups[by_span[(len(by_span) - 1) // 2]], is_comm, width) if groups else "",
    )
    return out


def format_graph_timeline(
    timeline: dict[str, Any], asked_comm_us: float | None = None, label: str = "graph replays"
) -> str:
    """`graph_timeline`'s result as printed: a summary line (per step, ms), busy time per stream (the 8 busiest,
    the rest summed), the chart.
    `asked_comm_us`: the emulated transfer time the step asked for (compared with the comm kernels' sum)."""
    t = timeline
    asked = f" (asked {asked_comm_us / 1e3:.2f} ms)" if asked_comm_us else ""
    busy = t["stream_busy_us"]
    top = busiest(busy, 8)
    rest = [us for s, us in busy.items() if s not in top]
    streams = ", ".join(f"{s}: {busy[s] / 1e3:.2f}" for s in top)
    streams += f", {len(rest)} more: {sum(rest) / 1e3:.2f}" if rest else ""
    return (
        f"{label}, {t['steps']} profiled steps: step {t['span_us'] / 1e3:.2f} ms on the GPU (busy "
        f"{t['busy_us'] / 1e3:.2f}, idle {t['idle_us'] / 1e3:.2f}), compute {t['compute_us'] / 1e3:.2f} ms, comm "
        f"{t['comm_us'] / 1e3:.2f} ms of which {t['hidden_us'] / 1e3:.2f} ms ({t['hidden_share']:.0%}) ran while "
        f"compute ran; comm kernels: {t['comm_kernels']:g} per step, {t['comm_kernel_sum_us'] / 1e3:.2f} ms "
        f"summed{asked}; comm {t['comm_by']}; steps split by {t['split_by']}\n"
        f"busy ms per step by stream: {streams}\n{t['chart']}"
    )
