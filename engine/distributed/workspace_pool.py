"""Dispatch workspaces shared by every MoE layer of a process: the seam the fixed-capacity backends (symm,
nvlink) lease their buffers from.

One pool per group (and device) and process, built when the dispatchers are built; each dispatcher holds a
reference, the forward path never looks a pool up. A workspace is leased from dispatch_start to
combine_finish; at most MAX_IN_FLIGHT per shape exist (two-batch overlap keeps two micro-batches' dispatches
in flight). Building one allocates symmetric memory, a collective: every rank reaches it together because
every rank runs the same layers in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, Protocol, TypeVar

MAX_IN_FLIGHT = 2  # two-batch overlap keeps two micro-batches' dispatches in flight


class Leasable(Protocol):
    in_use: bool


ShapeT = TypeVar("ShapeT", bound=Hashable)
WorkspaceT = TypeVar("WorkspaceT", bound=Leasable)


class WorkspacePool(Generic[ShapeT, WorkspaceT]):
    """Workspaces by shape, built by `build(shape)` on first need; `backend` names the dispatcher in errors."""

    def __init__(self, build: Callable[[ShapeT], WorkspaceT], backend: str):
        self._build, self.backend = build, backend
        self._pools: dict[ShapeT, list[WorkspaceT]] = {}

    def lease(self, shape: ShapeT) -> WorkspaceT:
        """A free workspace of this shape (built the first time it is needed)."""
        pool = self._pools.setdefault(shape, [])
        for ws in pool:
            if not ws.in_use:
                ws.in_use = True
                return ws
        if len(pool) >= MAX_IN_FLIGHT:
            raise RuntimeError(
                f"{self.backend} dispatcher: {len(pool) + 1} dispatches in flight, at most {MAX_IN_FLIGHT} (one "
                "per micro-batch): combine_finish each dispatch before the same micro-batch dispatches again"
            )
        ws = self._build(shape)
        ws.in_use = True
        pool.append(ws)
        return ws

    def reserve(self, shape: ShapeT, count: int) -> None:
        """Build `count` workspaces of this shape now (a collective) and leave them free."""
        for ws in [self.lease(shape) for _ in range(count)]:
            ws.in_use = False

    def release_all(self) -> None:
        """Mark every workspace free (after a step broke off between a dispatch and its combine)."""
        for ws in self.workspaces():
            ws.in_use = False

    def workspaces(self) -> Iterator[WorkspaceT]:
        for pool in self._pools.values():
            yield from pool
