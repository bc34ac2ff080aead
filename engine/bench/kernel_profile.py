"""GPU kernels of a profiled run by time per repetition: one markdown table (`moefleet bench --profile-steps`,
benchmarks/ep_dispatch.py --profile)."""

from __future__ import annotations

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
