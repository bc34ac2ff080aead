"""Per-rank MoE dispatch / combine time and bytes, sampled: a decorator over any `TokenDispatcher`.

`MeteredDispatcher` wraps a layer's dispatcher (a2a, deepep, symm, ...: nothing in the backends changes) and,
in one forward pass out of every `every`, measures each layer's dispatch (from `dispatch_start` entry to
`dispatch_finish` exit) and combine (from `combine_start` entry to `combine_finish` exit) and the bytes its
experts received (valid rows x hidden x element size, plus the FP8 scales of DeepEP low-latency rows).

Eager forwards: on CUDA the times are CUDA events and the byte count stays on the device until its event has
completed (read with `Event.query()`, never a synchronisation); on CPU they are `perf_counter` readings.

Forwards replayed from a CUDA graph (decode steps, cuda_graph_runner.py; expert-parallel decode with
`--cuda-graphs on`) run no Python, so they are measured by what the graph itself records:
1. Capture. `CudaGraphRunner.capture` opens one `GraphProbe` per captured graph (bucket) with
   `DispatchRecorder.capture()` inside `torch.cuda.graph`. While it is open, every `MeteredDispatcher` (every
   layer, every micro-batch dispatcher of a TBO step) records *external* timing events
   (`torch.cuda.Event(enable_timing=True, external=True)`) at the same four points as eagerly: they become
   event-record nodes of the graph, re-recorded by every replay. The valid rows each dispatch received are an
   int64 device scalar computed inside the graph (`counts.sum()`: one small kernel per dispatch, no `.item()`),
   held by the probe so that no other allocation reuses its memory and every replay rewrites it. Rows the host
   already knows at capture (host counts, unmasked rows) are a constant of the probe. Nothing is sampled
   eagerly while a probe is open, and the runner's warm-up forwards around the capture are not samples
   (`DispatchRecorder.pause`).
2. Replay. `CudaGraphRunner.replay` calls `probe.before_replay()`, launches the graph, then
   `probe.after_replay()`. A replay counts as one forward of the recorder (the same one-in-`every` counter as
   eager forwards); a sampled replay *arms* the probe: the rows' sum (per row size) and its non-blocking copy
   into pinned host memory, then a plain "done" event, all queued on the replay's stream after the graph.
3. Harvest. An armed probe is harvested once its done event has completed (`Event.query()`): then that replay
   and the row copies have finished, so `elapsed_time` of each captured (start, end) pair is that replay's
   per-layer dispatch / combine time, observed into the same histograms as eager samples, its bytes are added
   and `sampled_forwards` counts it. Harvesting happens in `DispatchRecorder.poll()` (every `stats()`, between
   engine steps) and in `before_replay()` of the same graph.
   The rule that keeps a sample from being misread: the events of a graph are only read while the armed replay
   is the latest launch of that graph. `before_replay()` settles the armed sample before the next launch of
   the graph: harvested if its done event has completed, else dropped (`graph_samples_dropped`), never read
   later, because the new replay re-records the same events. In the engine the step reads its sampled tokens
   on the host, so a replay has completed before the next step and samples are not dropped.
No host synchronisation is added to the replay path: event records, a sum and one D2H copy into pinned memory
per sampled replay, and `Event.query()`. Every replay (sampled or not) runs the captured event records and the
one row-count kernel per dispatch. With the metrics off (`every` = 0) no recorder is installed: no probe,
no event in any graph. On a torch without external events (`Event(external=...)`) graph replays are not
sampled (as before).

Each rank's `DispatchRecorder.stats()` is a flat dict of floats (histogram buckets, sums, counts, bytes);
it travels with the engine stats to the front end, whose /metrics exports it per rank with a `dp_rank` label
(`moefleet_moe_dispatch_seconds`, `moefleet_moe_combine_seconds`, `moefleet_moe_dispatch_bytes_total`,
`moefleet_moe_sampled_forwards_total`; engine/server/metrics.py). Sampling interval: environment variable
MOEFLEET_MOE_METRICS_EVERY (forward passes, eager or replayed; default 16; 0 = off).
Not thread-safe: the engine's step thread records, replays and reads the stats.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from moefleet.engine.layers.token_dispatch import ForwardingDispatcher

ENV_EVERY = "MOEFLEET_MOE_METRICS_EVERY"
DEFAULT_EVERY = 16

# Upper bounds (seconds) of the dispatch / combine histograms: tens of microseconds (NVLink, low latency)
# to a second (gloo on a loaded CPU).
SECONDS_BUCKETS: tuple[float, ...] = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
)  # fmt: skip
PARTS = ("dispatch", "combine")
# Keys of the flat stats dict (shared with engine/server/metrics.py).
BYTES_KEY = "moe_dispatch_bytes_total"
FORWARDS_KEY = "moe_sampled_forwards_total"
DROPPED_KEY = "moe_graph_samples_dropped_total"  # sampled graph replays not complete when relaunched

# make_event(timing) -> an event with record() / query() / elapsed_time(other): timing=True for the events
# captured in a graph (external timing events on CUDA), False for the host-side "done" event of a replay.
EventFactory = Callable[[bool], Any]


def bucket_key(part: str, index: int) -> str:
    return f"moe_{part}_seconds_bucket_{index}"


def sum_key(part: str) -> str:
    return f"moe_{part}_seconds_sum"


def count_key(part: str) -> str:
    return f"moe_{part}_seconds_count"


def every_from_env(env: Any = None) -> int:
    from moefleet.engine.topology import env_int

    every = env_int(os.environ if env is None else env, ENV_EVERY, DEFAULT_EVERY)
    if every < 0:
        raise ValueError(f"{ENV_EVERY} ({every}) must be >= 0 (0 turns the MoE communication metrics off)")
    return every


def cuda_graph_event(timing: bool) -> Any:
    """The CUDA events of graph probes: external timing events (recorded as event-record nodes when captured,
    re-recorded by every replay), or a plain event recorded after a replay."""
    if timing:
        return torch.cuda.Event(enable_timing=True, external=True)
    return torch.cuda.Event()


def external_events_supported() -> bool:
    """Whether this torch has `torch.cuda.Event(external=True)` (graph replays can be sampled)."""
    try:
        cuda_graph_event(True)
    except TypeError:  # a torch without external events
        return False
    return True


def to_host(value: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor without a synchronisation: pinned memory, queued on the current stream
    (valid once an event recorded after it has completed). A CPU tensor is cloned."""
    if not value.is_cuda:
        return value.clone()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    return host


@dataclass
class _Histogram:
    counts: list[int]  # per bucket (not cumulative); the last is +Inf
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1
        self.total += seconds


class DispatchRecorder:
    """This rank's samples. One per process; every `MeteredDispatcher` of the model shares it, and so do the
    `GraphProbe`s of the captured decode graphs."""

    def __init__(self, every: int = DEFAULT_EVERY):
        if every < 1:
            raise ValueError(f"every ({every}) must be >= 1")
        self.every = every
        self.forwards = 0  # forward passes seen (sampled or not; eager or replayed from a graph)
        self.sampled_forwards = 0
        self.sampling = False
        self.paused = False  # warm-up forwards (engine start, graph capture): neither counted nor sampled
        self.bytes_total = 0
        self.histograms = {part: _Histogram([0] * (len(SECONDS_BUCKETS) + 1)) for part in PARTS}
        self._pending: list[
            tuple[str, Any, Any]
        ] = []  # (part or "bytes", start event / None, end event / value)
        self.probe: GraphProbe | None = None  # open while a CUDA graph is being captured (`capture`)
        self.probes: list[GraphProbe] = []  # of the captured graphs, polled for armed samples
        self.graph_samples_dropped = 0  # armed replays not complete when their graph was launched again

    def next_forward(self) -> bool:
        """Count one forward pass (eager or a graph replay); whether it is sampled."""
        sampled = self.forwards % self.every == 0
        self.forwards += 1
        return sampled

    def begin_forward(self) -> None:
        """Called by the first MoE layer's first micro-batch: decides whether this forward is sampled eagerly
        (never while paused or while a graph is being captured: a capture records into its probe)."""
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if self.paused or self.probe is not None or capturing:
            self.sampling = False
            return
        self.sampling = self.next_forward()
        if self.sampling:
            self.sampled_forwards += 1

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Forwards run inside are not counted or sampled (warm-ups); graph probes still capture."""
        previous, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = previous

    @contextmanager
    def capture(self, make_event: EventFactory | None = None) -> Iterator[GraphProbe | None]:
        """Open a `GraphProbe` for the CUDA graph being captured now (enter inside `torch.cuda.graph`): the
        metered dispatchers record into it; on a normal exit it is kept for polling (not after an exception).
        Yields None (nothing recorded) on a torch without external events. `make_event`: tests."""
        if make_event is None:
            if not external_events_supported():
                yield None
                return
            make_event = cuda_graph_event
        probe = GraphProbe(self, make_event)
        self.probe = probe
        try:
            yield probe
        finally:
            self.probe = None
        self.probes.append(probe)

    def forget(self, probes: Iterable[GraphProbe]) -> None:
        """Stop polling `probes` (their graphs were discarded, e.g. a later capture failed)."""
        gone = {id(p) for p in probes}
        self.probes = [p for p in self.probes if id(p) not in gone]

    def observe(self, part: str, seconds: float) -> None:
        self.histograms[part].observe(seconds)

    def add_bytes(self, value: int) -> None:
        self.bytes_total += value

    def defer(self, kind: str, start: Any, end: Any) -> None:
        """A CUDA measurement to read once `end` (an event, or (event, pinned tensor) for bytes) completed."""
        self._pending.append((kind, start, end))

    def poll(self) -> None:
        """Fold in the CUDA measurements whose events have completed, eager ones and the armed samples of
        graph replays (non-blocking)."""
        still: list[tuple[str, Any, Any]] = []
        for kind, start, end in self._pending:
            event = end[0] if kind == "bytes" else end
            if not event.query():
                still.append((kind, start, end))
            elif kind == "bytes":
                self.bytes_total += int(end[1].item())  # pinned host tensor, already written
            else:
                self.observe(kind, start.elapsed_time(end) / 1e3)
        self._pending = still
        for probe in self.probes:
            probe.harvest()

    def stats(self) -> dict[str, float]:
        """Flat, cumulative numbers for the engine stats exchange (Prometheus buckets are cumulative)."""
        self.poll()
        out: dict[str, float] = {
            BYTES_KEY: float(self.bytes_total),
            FORWARDS_KEY: float(self.sampled_forwards),
            DROPPED_KEY: float(self.graph_samples_dropped),
        }
        for part, hist in self.histograms.items():
            running = 0
            for index, count in enumerate(hist.counts):
                running += count
                out[bucket_key(part, index)] = float(running)
            out[sum_key(part)] = hist.total
            out[count_key(part)] = float(running)
        return out


@dataclass
class _Armed:
    """A sampled replay of a probe's graph, not read yet."""

    done: Any  # plain event recorded after the replay (and after the row copies)
    rows: list[tuple[int, torch.Tensor]]  # (row bytes, the replay's valid rows in pinned host memory)


class GraphProbe:
    """What one captured CUDA graph re-records on every replay: per MoE layer and micro-batch dispatcher, the
    (part, start, end) timing events of its dispatch and combine, and the rows its experts received (see the
    module docstring for the data flow and the harvest rule). Built by `DispatchRecorder.capture`."""

    def __init__(self, recorder: DispatchRecorder, make_event: EventFactory):
        self.recorder, self.make_event = recorder, make_event
        self.spans: list[tuple[str, Any, Any]] = []  # (part, start event, end event), capture order
        # row bytes -> per dispatch: its valid rows, an int64 scalar computed inside the graph (every replay)
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.host_bytes = 0  # per replay: bytes known on the host at capture
        self.armed: _Armed | None = None
        self.replays = self.harvested = self.dropped = 0

    # ---- capture (MeteredDispatcher, while the probe is open) ----

    def mark(self) -> Any:
        event = self.make_event(True)
        event.record()
        return event

    def span(self, part: str, start: Any, end: Any) -> None:
        self.spans.append((part, start, end))

    def add_rows(self, rows: int | torch.Tensor, row_size: int) -> None:
        if isinstance(rows, torch.Tensor):
            self.rows.setdefault(row_size, []).append(rows)
        else:
            self.host_bytes += rows * row_size

    # ---- replay (CudaGraphRunner.replay) ----

    def before_replay(self) -> None:
        """Right before the graph is launched again: settle the armed sample (harvested if its replay has
        completed, else dropped: the new launch re-records the events it would read)."""
        if self.armed is not None and not self.harvest():
            self.armed = None
            self.dropped += 1
            self.recorder.graph_samples_dropped += 1

    def after_replay(self) -> None:
        """Right after the graph was launched (on the stream it ran on): count the forward; arm a sampled one
        (queue the row sums, their copies to the host and the done event behind the replay)."""
        self.replays += 1
        if self.recorder.paused or not self.recorder.next_forward():
            return
        rows = [(size, to_host(torch.stack(values).sum())) for size, values in self.rows.items()]
        done = self.make_event(False)
        done.record()
        self.armed = _Armed(done, rows)

    def harvest(self) -> bool:
        """Read the armed sample if its replay has completed (never waits); True when none is left armed."""
        armed = self.armed
        if armed is None:
            return True
        if not armed.done.query():
            return False
        self.armed = None
        recorder = self.recorder
        for part, start, end in self.spans:
            recorder.observe(part, start.elapsed_time(end) / 1e3)
        device_bytes = sum(size * int(rows.item()) for size, rows in armed.rows)  # pinned host, written
        recorder.add_bytes(self.host_bytes + device_bytes)
        recorder.sampled_forwards += 1
        self.harvested += 1
        return True


def received_rows(dispatched: Any) -> int | torch.Tensor:
    """Valid rows this rank's experts received: from host counts, device counts (an int64 tensor on their
    device: no host sync), or every row."""
    if dispatched.tokens_per_expert is not None:
        return int(sum(dispatched.tokens_per_expert))
    if dispatched.counts is not None:
        return dispatched.counts.sum().to(torch.int64)
    return int(dispatched.hidden.shape[0])  # no counts at all: every received row is valid


def row_bytes(dispatched: Any) -> int:
    """Bytes of one received row: hidden x element size ([N, D] or [L, C, D]), plus the per-128-column scales
    FP8 rows (DeepEP low-latency) travel with."""
    hidden = dispatched.hidden
    size = (hidden.shape[-1] if hidden.dim() > 1 else 1) * hidden.element_size()
    scales = getattr(dispatched, "scales", None)
    if scales is not None:
        size += scales.shape[-1] * scales.element_size()
    return int(size)


@dataclass
class _Pending:
    inner: Any
    start: Any  # perf_counter float, or a CUDA event; None when not sampled
    probe: GraphProbe | None = None  # set while a graph is being captured: `start` is a captured event


class MeteredDispatcher(ForwardingDispatcher):
    """A `TokenDispatcher` that forwards to `inner` (backend-specific attributes too) and, in sampled forwards,
    records time and bytes; while a graph is being captured, into the recorder's open `GraphProbe`."""

    def __init__(self, inner: Any, recorder: DispatchRecorder, first: bool = False):
        super().__init__(inner)
        self.recorder = recorder
        self.first = first  # the first MoE layer's micro-batch 0: starts each forward's sampling decision

    def _mark(self, device: torch.device) -> Any:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, device: torch.device) -> tuple[Any, GraphProbe | None]:
        probe = self.recorder.probe
        if probe is not None:
            return probe.mark(), probe
        return (self._mark(device) if self.recorder.sampling else None), None

    def _done(self, part: str, start: Any, device: torch.device) -> None:
        if device.type == "cuda":
            self.recorder.defer(part, start, self._mark(device))
        else:
            self.recorder.observe(part, time.perf_counter() - start)

    def dispatch_start(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        is_prefill: bool | None = None,
    ) -> Any:
        if self.first:
            self.recorder.begin_forward()
        start, probe = self._start(hidden.device)
        return _Pending(
            self.inner.dispatch_start(hidden, topk_ids, topk_weights, is_prefill=is_prefill), start, probe
        )

    def dispatch_finish(self, pending: Any) -> Any:
        dispatched = self.inner.dispatch_finish(pending.inner)
        if pending.probe is not None:  # captured: re-recorded and recomputed by every replay
            pending.probe.span("dispatch", pending.start, pending.probe.mark())
            pending.probe.add_rows(received_rows(dispatched), row_bytes(dispatched))
        elif pending.start is not None:
            device = dispatched.hidden.device
            self._done("dispatch", pending.start, device)
            self._count_bytes(dispatched, device)
        return dispatched

    def combine_start(self, expert_output: torch.Tensor, dispatched: Any) -> Any:
        start, probe = self._start(expert_output.device)
        return _Pending(self.inner.combine_start(expert_output, dispatched), start, probe)

    def combine_finish(self, pending: Any) -> torch.Tensor:
        out: torch.Tensor = self.inner.combine_finish(pending.inner)
        if pending.probe is not None:
            pending.probe.span("combine", pending.start, pending.probe.mark())
        elif pending.start is not None:
            self._done("combine", pending.start, out.device)
        return out

    def _count_bytes(self, dispatched: Any, device: torch.device) -> None:
        rows = received_rows(dispatched)
        size = row_bytes(dispatched)
        if not isinstance(rows, torch.Tensor):
            self.recorder.add_bytes(rows * size)
        elif device.type == "cuda":  # device counts: read once the copy's event completed
            host = to_host(rows * size)
            event = torch.cuda.Event()
            event.record()
            self.recorder.defer("bytes", None, (event, host))
        else:
            self.recorder.add_bytes(int(rows) * size)


def paused(recorder: DispatchRecorder | None) -> AbstractContextManager[None]:
    """`recorder.pause()`, or nothing when metrics are off (None): warm-ups and captures are not samples."""
    return recorder.pause() if recorder is not None else nullcontext()


def install_dispatch_metrics(model: torch.nn.Module, recorder: DispatchRecorder) -> int:
    """Wrap every MoE layer's dispatchers (all micro-batches) in `MeteredDispatcher`s; returns the layers.
    Install before CUDA graphs are captured (the graphs then carry the probes: `recorder_of`)."""
    count = 0
    for module in model.modules():
        dispatchers = getattr(module, "dispatchers", None)
        if not isinstance(dispatchers, list) or not hasattr(module, "dispatcher"):
            continue
        wrapped = [
            MeteredDispatcher(d, recorder, first=count == 0 and i == 0) for i, d in enumerate(dispatchers)
        ]
        setattr(module, "dispatchers", wrapped)  # noqa: B010
        setattr(module, "dispatcher", wrapped[0])  # noqa: B010
        count += 1
    return count


def recorder_of(model: Any) -> DispatchRecorder | None:
    """The `DispatchRecorder` of the model's `MeteredDispatcher`s (None: metrics off or not installed)."""
    modules = getattr(model, "modules", None)
    for module in modules() if modules is not None else ():
        for dispatcher in getattr(module, "dispatchers", None) or ():
            if isinstance(dispatcher, MeteredDispatcher):
                return dispatcher.recorder
    return None
