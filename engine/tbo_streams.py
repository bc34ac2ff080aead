"""Two-batch overlap on the GPU: which overlap mechanism a step uses, and the comm stream that runs it.

`forward_tbo` (tbo.py) launches the two micro-batches' stages in its interleaved order through one `Overlap`:

- `"comm_stream"` (a2a, symm on CUDA): every communication stage (dispatch, combine) of a micro-batch runs on
  one dedicated comm stream per process and device (`comm_stream`, created once). Before it, the comm stream
  waits on an event recorded right after that micro-batch's previous compute stage; after it, an event is
  recorded on the comm stream, and that micro-batch's next compute stage waits on it. The other micro-batch's
  compute keeps running on the compute stream (the stream current when the step started) meanwhile. The
  combine's launch (`combine_start`), which sits inside the experts stage so the shared experts can follow
  it, is also diverted to the comm stream (`StreamedDispatcher`). At the end the compute stream waits on the
  last comm event of each micro-batch (the join a CUDA-graph capture needs too).
  a2a: torch.distributed collectives issued while the comm stream is current run on NCCL's internal stream,
  ordered after the comm stream at issue time; `work.wait()` orders the stream current at the wait (compute
  for dispatch_finish, comm for combine_finish) after NCCL's. symm: `all_to_all_vdev` is a kernel on the
  current stream, i.e. on the comm stream.
- `"recv_hook"` (DeepEP low-latency): the dispatcher already splits issue from receive (`return_recv_hook`):
  `*_start` only issues the sends, `*_finish` calls the hook that receives. The interleaved launch order then
  overlaps one micro-batch's transfer with the other's compute on a single stream; no side stream. DeepEP's
  normal kernels (prefill) run on the compute stream: no GPU overlap there yet.
- `"none"`: CPU (gloo) and the single-rank local path: the stages run in launch order on the current stream,
  exactly as before (the CPU parity suites run this).

Tensor lifetimes across streams: before each stage, every tensor the stage may read (the micro-batch's hidden
state and MoE step, walked recursively into the dispatcher's handle) is `record_stream`-ed on the stream about
to run it, and so are the arguments of a diverted `combine_start`; the caching allocator then reuses no block
before the consumer's work is done. The batch's own tensors live past the final join, so they need nothing.
Dispatchers keep what their collectives read in their handles (a2a: the send rows), so nothing a collective
still reads is freed inside `*_start`. Only the stream API is behind `StreamOps`, so a recording fake checks the launch order and the
waits on CPU with the model running for real (tests/engine/test_tbo_streams.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from .layers.token_dispatch import ForwardingDispatcher

COMPUTE, COMM = "compute", "comm"
MECHANISMS = ("comm_stream", "recv_hook", "none")


# ---- the decision (pure) ----------------------------------------------------------------------------------


def choose_mechanism(device_type: str, dispatcher_overlaps: set[str]) -> tuple[str, str]:
    """(mechanism, why) for a TBO step. `dispatcher_overlaps` holds each MoE dispatcher's `TBO_OVERLAP`
    ("comm_stream", "recv_hook"; "none" for the local path; missing attributes count as "none")."""
    if device_type != "cuda":
        return "none", f"device {device_type!r}: stages run in launch order on one stream"
    if not dispatcher_overlaps:
        return "none", "no MoE dispatcher: nothing to overlap"
    if dispatcher_overlaps == {"comm_stream"}:
        return "comm_stream", "dispatch/combine on a dedicated comm stream, ordered by events"
    if dispatcher_overlaps == {"recv_hook"}:
        return "recv_hook", "DeepEP low-latency receive hooks: issue in *_start, receive in *_finish"
    return "none", f"dispatchers {sorted(dispatcher_overlaps)}: launch order only"


def dispatcher_overlaps(model: Any) -> set[str]:
    """The `TBO_OVERLAP` of every micro-batch dispatcher of the model's MoE layers."""
    kinds: set[str] = set()
    for layer in getattr(getattr(model, "model", None), "layers", []):
        mlp = getattr(layer, "mlp", None)
        for dispatcher in getattr(mlp, "dispatchers", None) or [getattr(mlp, "dispatcher", None)]:
            if dispatcher is not None:
                kinds.add(getattr(dispatcher, "TBO_OVERLAP", "none"))
    return kinds


# ---- the stream API (faked in the tests) ------------------------------------------------------------------


class StreamOps(Protocol):
    def current_stream(self) -> Any: ...
    def comm_stream(self) -> Any: ...
    def record(self, stream: Any) -> Any: ...  # an event recorded on `stream` now
    def wait(self, stream: Any, event: Any) -> None: ...  # `stream` waits on `event`
    def use(self, stream: Any) -> AbstractContextManager[Any]: ...  # make `stream` current
    def keep(self, tensor: torch.Tensor, stream: Any) -> None: ...  # tensor.record_stream(stream)


_COMM_STREAMS: dict[int, Any] = {}
# The comm stream is a high-priority stream: its kernels (the dispatcher's permutes, DeepEP / nvlink copies, the
# emulated waits) get SMs as soon as blocks of the other micro-batch's compute retire, instead of queueing behind
# whole waves of a large GEMM (measured on 1x H200, EP32 prefill with emulated 5 ms transfers: a 2.5 ms dispatch
# took 9.2 ms on a normal-priority stream beside attention). torch maps -1 to the device's nearest valid value.
COMM_STREAM_PRIORITY = -1


def comm_stream(device: torch.device) -> Any:
    """The comm stream of `device` in this process (created on first use, then reused; high priority)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COMM_STREAMS:
        _COMM_STREAMS[index] = torch.cuda.Stream(device=index, priority=COMM_STREAM_PRIORITY)
    return _COMM_STREAMS[index]


class CudaStreamOps:
    def __init__(self, device: torch.device):
        self.device = device

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def comm_stream(self) -> Any:
        return comm_stream(self.device)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def use(self, stream: Any) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def keep(self, tensor: torch.Tensor, stream: Any) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)


def tensors_in(obj: Any, depth: int = 5) -> Iterator[torch.Tensor]:
    """Tensors reachable from `obj` through dataclass fields, lists, tuples and dict values."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth <= 0 or obj is None or isinstance(obj, (int, float, str, bool)):
        return
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name), depth - 1)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item, depth - 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item, depth - 1)


# ---- running the stages -----------------------------------------------------------------------------------


class Overlap:
    """Launch order only (mechanisms "none" and "recv_hook"): each stage runs on the current stream.
    `timer` (tbo_timeline.StageTimer, None: off) marks each stage's start and end on the stream that runs it."""

    mechanism = "none"
    timer: Any = None

    def run(self, micro_batch: int, kind: str, stage: Callable[[Any], None], state: Any) -> None:
        token = self._start(None)
        stage(state)
        self._stop(token, None, micro_batch, kind)

    def finish(self) -> None:
        return None

    def _start(self, stream: Any) -> Any:
        return self.timer.start(stream) if self.timer is not None else None

    def _stop(self, token: Any, stream: Any, micro_batch: int, kind: str) -> None:
        if self.timer is not None:
            self.timer.stop(token, stream, micro_batch, kind)


class StreamOverlap(Overlap):
    """Mechanism "comm_stream": compute stages on the current stream, comm stages on the comm stream."""

    mechanism = "comm_stream"

    def __init__(self, ops: StreamOps, nvtx: bool = False):
        """`nvtx`: name each stage in an NVTX range ("mb0 comm 5") for an Nsight Systems timeline."""
        self.ops, self.nvtx, self.index = ops, nvtx, [0, 0]
        self.compute = ops.current_stream()
        self.comm = ops.comm_stream()
        self.computed: dict[int, Any] = {}  # micro-batch -> event after its latest compute stage
        self.communicated: dict[
            int, Any
        ] = {}  # micro-batch -> event after its latest comm, not waited on yet

    def _keep(self, obj: Any, stream: Any) -> None:
        for tensor in tensors_in(obj):
            self.ops.keep(tensor, stream)

    def _keep_state(self, state: Any, stream: Any) -> None:
        """The tensors a stage may read that can die before the step's join: the micro-batch's hidden
        state and MoE step (with the dispatcher's handle). The batch's own tensors live past the join."""
        self._keep((getattr(state, "hidden", None), getattr(state, "moe", None)), stream)

    def run(self, micro_batch: int, kind: str, stage: Callable[[Any], None], state: Any) -> None:
        if not self.nvtx:
            return self._run(micro_batch, kind, stage, state)
        torch.cuda.nvtx.range_push(f"mb{micro_batch} {kind} {self.index[micro_batch]}")
        try:
            self._run(micro_batch, kind, stage, state)
        finally:
            torch.cuda.nvtx.range_pop()
            self.index[micro_batch] += 1

    def _run(self, micro_batch: int, kind: str, stage: Callable[[Any], None], state: Any) -> None:
        if kind == COMM:
            event = self.computed.get(micro_batch)
            if event is not None:
                self.ops.wait(self.comm, event)
            self._keep_state(state, self.comm)
            token = self._start(self.comm)
            with self.ops.use(self.comm):
                stage(state)
            self._stop(token, self.comm, micro_batch, COMM)
            self.communicated[micro_batch] = self.ops.record(self.comm)
            return
        event = self.communicated.pop(micro_batch, None)
        if event is not None:
            self.ops.wait(self.compute, event)
        self._keep_state(state, self.compute)
        token = self._start(self.compute)
        stage(state)
        self._stop(token, self.compute, micro_batch, COMPUTE)
        self.computed[micro_batch] = self.ops.record(self.compute)

    def divert(self, micro_batch: int, launch: Callable[..., Any], *args: Any) -> Any:
        """Run a communication launch found inside a compute stage (`combine_start`) on the comm stream,
        after the compute issued so far; the micro-batch's next compute waits on it."""
        self.ops.wait(self.comm, self.ops.record(self.compute))
        self._keep(args, self.comm)
        token = self._start(self.comm)
        with self.ops.use(self.comm):
            result = launch(*args)
        self._stop(token, self.comm, micro_batch, COMM)
        self.communicated[micro_batch] = self.ops.record(self.comm)
        return result

    def finish(self) -> None:
        """Join: the compute stream waits on every comm event not waited on yet."""
        for micro_batch in sorted(self.communicated):
            self.ops.wait(self.compute, self.communicated.pop(micro_batch))


class StreamedDispatcher(ForwardingDispatcher):
    """A micro-batch's dispatcher whose `combine_start` runs on the comm stream (`StreamOverlap.divert`)."""

    def __init__(self, inner: Any, overlap: StreamOverlap, micro_batch: int):
        super().__init__(inner)
        self.overlap, self.micro_batch = overlap, micro_batch

    def combine_start(self, expert_output: torch.Tensor, dispatched: Any) -> Any:
        return self.overlap.divert(self.micro_batch, self.inner.combine_start, expert_output, dispatched)


def make_overlap(model: Any, device: torch.device, ops: StreamOps | None = None) -> Overlap:
    """The `Overlap` of one TBO step of `model` on `device`; `ops` replaces the CUDA stream API (tests)."""
    if ops is not None:
        return StreamOverlap(ops)
    mechanism, _ = choose_mechanism(device.type, dispatcher_overlaps(model))
    if mechanism != "comm_stream":
        return Overlap()
    return StreamOverlap(CudaStreamOps(device), nvtx=os.environ.get("MOEFLEET_TBO_NVTX") == "1")
