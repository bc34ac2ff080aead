"""Per-rank MoE dispatch / combine time and bytes, sampled: a decorator over any `TokenDispatcher`.

`MeteredDispatcher` wraps a layer's dispatcher (a2a, deepep, symm, ...: nothing in the backends changes) and,
in one forward pass out of every `every`, measures each layer's dispatch (from `dispatch_start` entry to
`dispatch_finish` exit) and combine (from `combine_start` entry to `combine_finish` exit) and the bytes its
experts received (rows x hidden x element size). On CUDA the times are CUDA events and the byte count stays
on the device until its event has completed (read with `Event.query()`, never a synchronisation); on CPU
they are `perf_counter` readings. Nothing is measured while a CUDA graph is being captured (graph replays run
no Python, so decode steps under CUDA graphs are not sampled).

Each rank's `DispatchRecorder.stats()` is a flat dict of floats (histogram buckets, sums, counts, bytes);
it travels with the engine stats to the front end, whose /metrics exports it per rank with a `dp_rank` label
(`moefleet_moe_dispatch_seconds`, `moefleet_moe_combine_seconds`, `moefleet_moe_dispatch_bytes_total`,
`moefleet_moe_sampled_forwards_total`; engine/server/metrics.py). Sampling interval: environment variable
MOEFLEET_MOE_METRICS_EVERY (forward passes, default 16; 0 = off).
"""

from __future__ import annotations

import bisect
import os
import time
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


@dataclass
class _Histogram:
    counts: list[int]  # per bucket (not cumulative); the last is +Inf
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1
        self.total += seconds


class DispatchRecorder:
    """This rank's samples. One per process; every `MeteredDispatcher` of the model shares it."""

    def __init__(self, every: int = DEFAULT_EVERY):
        if every < 1:
            raise ValueError(f"every ({every}) must be >= 1")
        self.every = every
        self.forwards = 0  # forward passes seen (sampled or not)
        self.sampled_forwards = 0
        self.sampling = False
        self.bytes_total = 0
        self.histograms = {part: _Histogram([0] * (len(SECONDS_BUCKETS) + 1)) for part in PARTS}
        self._pending: list[
            tuple[str, Any, Any]
        ] = []  # (part or "bytes", start event / None, end event / value)

    def begin_forward(self) -> None:
        """Called by the first MoE layer's first micro-batch: decides whether this forward is sampled."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self.sampling = False
            return
        self.sampling = self.forwards % self.every == 0
        self.forwards += 1
        if self.sampling:
            self.sampled_forwards += 1

    def observe(self, part: str, seconds: float) -> None:
        self.histograms[part].observe(seconds)

    def add_bytes(self, value: int) -> None:
        self.bytes_total += value

    def defer(self, kind: str, start: Any, end: Any) -> None:
        """A CUDA measurement to read once `end` (an event, or (event, pinned tensor) for bytes) completed."""
        self._pending.append((kind, start, end))

    def poll(self) -> None:
        """Fold in the CUDA measurements whose events have completed (non-blocking)."""
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

    def stats(self) -> dict[str, float]:
        """Flat, cumulative numbers for the engine stats exchange (Prometheus buckets are cumulative)."""
        self.poll()
        out: dict[str, float] = {
            BYTES_KEY: float(self.bytes_total),
            FORWARDS_KEY: float(self.sampled_forwards),
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
class _Pending:
    inner: Any
    start: Any  # perf_counter float, or a CUDA event; None when not sampled


class MeteredDispatcher(ForwardingDispatcher):
    """A `TokenDispatcher` that forwards to `inner` (backend-specific attributes too) and, in sampled forwards,
    records time and bytes."""

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
        start = self._mark(hidden.device) if self.recorder.sampling else None
        return _Pending(
            self.inner.dispatch_start(hidden, topk_ids, topk_weights, is_prefill=is_prefill), start
        )

    def dispatch_finish(self, pending: Any) -> Any:
        dispatched = self.inner.dispatch_finish(pending.inner)
        if pending.start is not None:
            device = dispatched.hidden.device
            self._done("dispatch", pending.start, device)
            self._count_bytes(dispatched, device)
        return dispatched

    def combine_start(self, expert_output: torch.Tensor, dispatched: Any) -> Any:
        start = self._mark(expert_output.device) if self.recorder.sampling else None
        return _Pending(self.inner.combine_start(expert_output, dispatched), start)

    def combine_finish(self, pending: Any) -> torch.Tensor:
        out: torch.Tensor = self.inner.combine_finish(pending.inner)
        if pending.start is not None:
            self._done("combine", pending.start, out.device)
        return out

    def _count_bytes(self, dispatched: Any, device: torch.device) -> None:
        hidden = dispatched.hidden
        row_bytes = (
            hidden.shape[-1] if hidden.dim() > 1 else 1
        ) * hidden.element_size()  # [N, D] or [L, C, D]
        scales = getattr(dispatched, "scales", None)
        if scales is not None:  # FP8 rows (DeepEP low-latency) travel with their per-128-column scales
            row_bytes += scales.shape[-1] * scales.element_size()
        if dispatched.tokens_per_expert is not None:
            self.recorder.add_bytes(int(sum(dispatched.tokens_per_expert)) * row_bytes)
        elif dispatched.counts is not None and device.type == "cuda":
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(dispatched.counts.sum().to(torch.int64) * row_bytes, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.recorder.defer("bytes", None, (event, host))
        elif dispatched.counts is not None:
            self.recorder.add_bytes(int(dispatched.counts.sum()) * row_bytes)
        else:  # no counts at all: every received row is valid
            self.recorder.add_bytes(hidden.shape[0] * row_bytes)


def install_dispatch_metrics(model: torch.nn.Module, recorder: DispatchRecorder) -> int:
    """Wrap every MoE layer's dispatchers (all micro-batches) in `MeteredDispatcher`s; returns the layers."""
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
