"""EPLB on one rank: the recorder, the current placement, and the commands every rank runs in lockstep.

Commands ("read": all-reduce the load window; "rebalance": plan + move weights) enter on the front end
(`submit`, from the admin API or the automatic interval) and travel to every rank with the request
hand-over (`GroupCommand` through `RequestRouter.exchange`), so every rank sees them at the same step
boundary. `on_step_boundary` runs on every rank after each exchange, before the next forward: it advances
the recorder, then works on the oldest command; a rebalance moves `layers_per_step` MoE layers per
boundary (the pause stays bounded, requests keep running between chunks; each layer switches maps and
weights together, so outputs never change). All decisions use group-wide data only (all-reduced integer
loads, the shared step count), so every rank computes the same plan without sending it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from moefleet.engine.eplb import planner
from moefleet.engine.eplb.config import EPLBConfig
from moefleet.engine.eplb.expert_location import ExpertLocation, layer_index, moe_layers
from moefleet.engine.eplb.rebalance import apply_layers
from moefleet.engine.eplb.recorder import ExpertLoadRecorder
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EPLBCommand:
    kind: str  # "read" | "rebalance"
    command_id: int


@dataclass
class _Rebalance:
    command: EPLBCommand
    new: ExpertLocation
    balancedness_before: float
    predicted: float
    predicted_per_layer: list[float]
    chunks: deque[list[int]]
    moved: int = 0
    pause_s: float = 0.0
    max_pause_s: float = 0.0


@dataclass
class EPLBSnapshot:
    """The last group-wide reading (every rank keeps one; metrics show it)."""

    balancedness: float = 1.0
    per_layer: list[float] = field(default_factory=list)
    window_steps: int = 0
    read_at_step: int = -1


class EPLBController:
    def __init__(
        self,
        model: nn.Module,
        config: EPLBConfig,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        num_nodes: int = 1,
        num_groups: int = 1,
    ):
        named = list(moe_layers(model))
        if not named:
            raise ValueError("EPLB needs a model with MoE layers")
        self.layers = [layer for _, layer in named]
        self.layer_ids = [layer_index(name) for name, _ in named]
        self.config, self.rank, self.world_size, self.group = config, rank, world_size, group
        self.num_nodes, self.num_groups = num_nodes, num_groups
        first = self.layers[0]
        num_logical = int(first.logical_replicas.shape[0])  # type: ignore[union-attr,index]
        self.location = ExpertLocation.initial(
            len(self.layers), num_logical, config.num_redundant_experts, world_size
        )
        device = first.logical_replicas.device  # type: ignore[union-attr]
        self.recorder = ExpertLoadRecorder(len(self.layers), num_logical, config.window_steps, device)
        self.recorder.attach(self.layers)
        self.snapshot = EPLBSnapshot(per_layer=[1.0] * len(self.layers))
        self.rebalances_total = 0
        self.routed_tokens_total = 0  # this rank's routed (token, expert) hits, as of the last reading
        self.rebalance_seconds: list[float] = []
        self.forward_steps = 0
        self._steps_seen: int | None = None
        self._last_rebalance_step = 0
        self._last_read_step = 0
        self._queue: deque[EPLBCommand] = deque()
        self._active: _Rebalance | None = None
        # Front end only: how commands leave (RequestRouter.submit of a GroupCommand) and who waits.
        self._submit: Callable[[EPLBCommand], None] | None = None
        self._futures: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()  # automatic commands not yet run (front end)

    # ---- front end ---------------------------------------------------------------------------------------

    def bind(self, submit: Callable[[EPLBCommand], None]) -> None:
        """On the front end: `submit` hands a command to every rank at the next step boundary."""
        self._submit = submit

    @property
    def accepts_commands(self) -> bool:
        return self._submit is not None

    def submit(self, kind: str) -> Future:
        """Front end, any thread: run `kind` on every rank at the next boundary; the future gets the result."""
        if self._submit is None:
            raise RuntimeError("EPLB commands enter through the group's front end (rank 0)")
        future: Future = Future()
        with self._lock:
            command = EPLBCommand(kind, next(self._ids))
            self._futures[command.command_id] = future
        self._submit(command)
        return future

    def _auto(self, kind: str) -> None:
        if kind not in self._in_flight:
            self._in_flight.add(kind)
            self.submit(kind)

    # ---- every rank --------------------------------------------------------------------------------------

    def on_step_boundary(self, commands: list[Any], steps_total: int) -> None:
        """Every rank, every loop iteration, after the request exchange (`steps_total`: engine forwards)."""
        new_steps = 0 if self._steps_seen is None else steps_total - self._steps_seen
        self._steps_seen = steps_total
        for _ in range(new_steps):
            self.recorder.step()
        self.forward_steps += new_steps
        self._queue.extend(c for c in commands if isinstance(c, EPLBCommand))
        if self._active is not None:
            self._continue_rebalance()
        elif self._queue:
            command = self._queue.popleft()
            if command.kind == "read":
                self._finish(command, self.read())
            elif command.kind == "rebalance":
                self._start_rebalance(command)
            else:
                self._finish(command, ValueError(f"unknown EPLB command {command.kind!r}"))
        if self._submit is not None:
            self._schedule_automatic()

    def _schedule_automatic(self) -> None:
        cfg = self.config
        if cfg.interval_steps and self.forward_steps - self._last_rebalance_step >= cfg.interval_steps:
            self._auto("rebalance")
        elif self.forward_steps - self._last_read_step >= cfg.stats_every_steps:
            self._auto("read")

    def read(self) -> dict[str, Any]:
        """All-reduce the window (collective) and refresh the snapshot."""
        loads = self.recorder.read(self.group)
        per_layer = [
            planner.balancedness(w, p, self.world_size)
            for w, p in zip(loads, self.location.phy2log, strict=True)
        ]
        self.snapshot = EPLBSnapshot(
            sum(per_layer) / len(per_layer), per_layer, self.recorder.steps_in_window, self.forward_steps
        )
        self._last_read_step = self.forward_steps
        self.routed_tokens_total = self.recorder.routed_tokens_total()
        return self.state()

    def state(self) -> dict[str, Any]:
        """What GET /admin/eplb answers (from the last reading)."""
        snap = self.snapshot
        return {
            "balancedness": snap.balancedness,
            "per_layer": [
                {"layer": layer, "balancedness": b}
                for layer, b in zip(self.layer_ids, snap.per_layer, strict=True)
            ],
            "window_steps": snap.window_steps,
            "window_size_steps": self.config.window_steps,
            "rebalances": self.rebalances_total,
            "interval_steps": self.config.interval_steps,
            "rebalance_in_progress": self._active is not None,
            "placement": self.location.summary(),
        }

    def _start_rebalance(self, command: EPLBCommand) -> None:
        started = time.perf_counter()
        loads = self.recorder.read(self.group)
        old = self.location
        before = [
            planner.balancedness(w, p, self.world_size) for w, p in zip(loads, old.phy2log, strict=True)
        ]
        plan = planner.plan(
            loads, old.num_physical, self.world_size, self.num_nodes, self.num_groups, previous=old.phy2log
        )
        new = ExpertLocation(old.num_logical, self.world_size, plan.phy2log)
        step = self.config.layers_per_step
        layers = list(range(len(self.layers)))
        chunks = deque(layers[i : i + step] for i in range(0, len(layers), step))
        self._active = _Rebalance(
            command,
            new,
            sum(before) / len(before),
            plan.mean_predicted_balancedness,
            plan.predicted_balancedness,
            chunks,
        )
        self._active.pause_s = time.perf_counter() - started
        self._continue_rebalance()

    def _continue_rebalance(self) -> None:
        job = self._active
        assert job is not None
        started = time.perf_counter()
        chunk = job.chunks.popleft()
        job.moved += apply_layers(self.layers, self.location, job.new, chunk, self.rank, self.group)
        for i in chunk:  # this chunk now runs on the new placement
            self.location.phy2log[i] = list(job.new.phy2log[i])
        spent = time.perf_counter() - started
        job.pause_s += spent
        job.max_pause_s = max(job.max_pause_s, spent)
        if job.chunks:
            return
        self._active = None
        self.recorder.reset()
        self.rebalances_total += 1
        self.rebalance_seconds.append(job.pause_s)
        self._last_rebalance_step = self.forward_steps
        self._last_read_step = self.forward_steps
        # Until the next reading: what the planner predicted for the new placement (window is empty).
        self.snapshot = EPLBSnapshot(job.predicted, list(job.predicted_per_layer), 0, self.forward_steps)
        result = {
            "balancedness_before": job.balancedness_before,
            "predicted_balancedness": job.predicted,
            "pause_seconds": job.pause_s,
            "max_step_pause_seconds": job.max_pause_s,
            "moved_experts": job.moved,
            "layers": len(self.layers),
        }
        if self.rank == 0:
            logger.info("EPLB rebalance done: %s", result)
        self._finish(job.command, result)

    def _finish(self, command: EPLBCommand, result: Any) -> None:
        self._in_flight.discard(command.kind)
        with self._lock:
            future = self._futures.pop(command.command_id, None)
        if future is None:
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def fail_pending(self, error: BaseException) -> None:
        """The loop stopped: nobody will answer the waiting admin requests."""
        with self._lock:
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            if not future.done():
                future.set_exception(error)


_current: EPLBController | None = None


def set_current(controller: EPLBController | None) -> None:
    """One rank per process: the admin API and /metrics find this process's controller here."""
    global _current
    _current = controller


def current() -> EPLBController | None:
    return _current
