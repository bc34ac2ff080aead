"""Profiled runs of `moefleet bench`: the GPU kernels by time per repetition as one markdown table
(`--profile-steps`, benchmarks/ep_dispatch.py --profile), and the Chrome trace of a few decode steps replayed
from a CUDA graph for their timeline (`--tbo-timeline` with graphs: trace_timeline.py)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any


def kernel_table(prof: Any, repeats: int, title: str, top: int = 25) -> str:
    """`prof`: a finished torch.profiler run of `repeats` repetitions -> "title: N us of GPU time" and one row
    per CUDA kernel (calls, us and share per repetition), the `top` longest first."""
    rows = sorted(
        (e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"),
        key=lambda e: -e.device_time_total,
    )
    total = sum(e.device_time_total for e in rows) / repeats
    lines = [f"{title}: {total:.0f} us of GPU time", "| kernel | calls | us | share |", "|---|---|---|---|"]
    for e in rows[:top]:
        us = e.device_time_total / repeats
        lines.append(f"| {e.key[:80]} | {e.count / repeats:.1f} | {us:.1f} | {us / total:.0%} |")
    return "\n".join(lines)


def step_trace(
    run_step: Callable[[Any], None],
    batches: Sequence[Any],
    device: Any,
    barrier: Callable[[], None] = lambda: None,
    gap_s: float = 0.002,
) -> dict[str, Any]:
    """One step per batch under torch.profiler (CPU and CUDA activities), each inside a
    `record_function(trace_timeline.STEP_MARK)` window that closes after a device synchronisation, the steps
    `gap_s` apart (idle GPU between them, so the steps also separate by gaps); returns the exported Chrome trace
    (`trace_timeline.kernel_events` / `step_windows` read it)."""
    import torch
    from moefleet.engine.trace_timeline import STEP_MARK
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            barrier()
            torch.cuda.synchronize(device)
            time.sleep(gap_s)
            with record_function(STEP_MARK):
                run_step(batch)
                torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return dict(json.load(f))
