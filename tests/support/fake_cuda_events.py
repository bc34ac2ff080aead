"""Stand-ins for CUDA events on CPU, for the CUDA-graph dispatch metrics (engine/dispatch_metrics.py): a fake
GPU with one in-order stream. While a graph is being captured, recorded events become nodes of that graph
(they do not run); a replay queues its nodes again (pending until the fake GPU runs); `run()` completes the
queue. `elapsed_time` raises on an event that has not completed, as torch's does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FakeEvent:
    def __init__(self, gpu: FakeGPU, timing: bool):
        self.gpu, self.timing = gpu, timing
        self.done, self.at = False, 0.0  # completion time once done (ms on the fake GPU clock)

    def record(self) -> None:
        self.gpu.record(self)

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, other: FakeEvent) -> float:
        if not (self.timing and other.timing):
            raise ValueError("Both events must be created with argument 'enable_timing=True'.")
        if not (self.done and other.done):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return other.at - self.at


class FakeGPU:
    """One in-order stream. While `capturing`, recorded events become nodes of the graph being captured (they
    do not run); `replay(nodes)` queues them again; `run()` completes the queue, `ms` apart per event."""

    def __init__(self, ms: float = 0.5):
        self.ms, self.clock = ms, 0.0
        self.capturing: list[FakeEvent] | None = None
        self.queue: list[FakeEvent] = []

    def event(self, timing: bool) -> FakeEvent:
        return FakeEvent(self, timing)

    def record(self, event: FakeEvent) -> None:
        if self.capturing is not None:
            self.capturing.append(event)
        else:
            event.done = False  # re-recorded: pending again
            self.queue.append(event)

    def replay(self, nodes: list[FakeEvent]) -> None:
        for event in nodes:
            self.record(event)

    def run(self) -> None:
        for event in self.queue:
            self.clock += self.ms
            event.done, event.at = True, self.clock
        self.queue.clear()


def capture(recorder: Any, gpu: FakeGPU, forward: Callable[[], Any]) -> tuple[Any, list[FakeEvent]]:
    """A fake capture of `forward` with the recorder's graph probe open: (probe, the graph's event nodes)."""
    gpu.capturing = nodes = []
    try:
        with recorder.capture(make_event=gpu.event) as probe:
            forward()
    finally:
        gpu.capturing = None
    return probe, nodes
