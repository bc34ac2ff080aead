"""engine/bench/kernel_profile.py: the kernel table of a profiled run, per repetition, on hand-made events."""

from __future__ import annotations

from types import SimpleNamespace

from moefleet.engine.bench.kernel_profile import kernel_table


def event(key: str, us: float, count: int, device: str = "CUDA") -> SimpleNamespace:
    return SimpleNamespace(
        key=key, device_time_total=us, count=count, device_type=SimpleNamespace(name=device)
    )


def test_rows_per_repetition_longest_first_host_events_left_out():
    prof = SimpleNamespace(
        key_averages=lambda: [
            event("small", 100.0, 4),
            event("gemm", 300.0, 2),
            event("host op", 999.0, 1, device="CPU"),
            event("idle", 0.0, 3),
        ]
    )
    lines = kernel_table(prof, 2, "title", top=1).splitlines()
    assert lines[0] == "title: 200 us of GPU time"  # (300 + 100) / 2 repetitions
    assert lines[3] == "| gemm | 1.0 | 150.0 | 75% |"
    assert len(lines) == 4  # top=1
