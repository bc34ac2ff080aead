"""Hand requests from the front end (HTTP server on node 0, rank 0) to DP ranks, and results back.

Design: piggy-back on the step loop. Every rank calls `exchange` once per step, before the DP step
agreement, over the CPU gloo group (works across nodes through the same rendezvous, no extra ports):
  1. gather to the front-end rank: each rank's load (tokens running + queued), its outputs of the last
     step (finished tokens, opaque Python objects) and its engine stats (`rank_stats`: what the front end's
     `/metrics` sums over the group);
  2. the front end delivers the outputs, drains its inbox of new requests/aborts, places each new request on
     the least-loaded rank (`pick_dp_rank`, counting what it just placed), and routes aborts to the owner;
  3. scatter the per-rank message lists.
The cost is two small pickled collectives per step; the win is that requests only land between steps, so
every rank's scheduler sees them at a step boundary, and there is no second channel to fail separately.
When the whole group is idle the front-end rank should `wait_for_inbox(timeout)` (well under the process
group timeout) before calling `exchange`, so the loop does not spin; the other ranks simply block in the
gather until it does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from moefleet.engine.distributed.dp import pick_dp_rank


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    payload: Any  # whatever the engine's add_request needs (prompt ids, sampling params)
    cost: int = 1  # load it adds to its rank until the next exchange reports real loads
    rank: int | None = None  # place it on this rank (e.g. where its KV will land), not the least-loaded one


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Every rank leaves its serving loop after this exchange."""


@dataclass(frozen=True, slots=True)
class GroupCommand:
    """Reaches every rank in the same exchange, i.e. at one step boundary all ranks agree on (e.g. an EPLB
    rebalance); `DPEngineLoop` hands the payload to its step-boundary hook."""

    payload: Any


Message = AddRequest | AbortRequest | Shutdown | GroupCommand


def route_messages(
    inbox: list[Message], loads: list[int], owners: dict[str, int], start: int = 0
) -> list[list[Message]]:
    """Pure: split front-end messages into one list per rank. New requests go to the least-loaded rank
    (loads updated as they are placed; `owners` records request -> rank), aborts to the owning rank
    (dropped if unknown, e.g. already finished), Shutdown and GroupCommands to every rank."""
    loads = list(loads)
    per_rank: list[list[Message]] = [[] for _ in loads]
    for i, message in enumerate(inbox):
        if isinstance(message, AddRequest):
            rank = message.rank
            if rank is None or not 0 <= rank < len(loads):
                rank = pick_dp_rank(loads, start + i)
            loads[rank] += message.cost
            owners[message.request_id] = rank
            per_rank[rank].append(message)
        elif isinstance(message, Shutdown | GroupCommand):
            for messages in per_rank:
                messages.append(message)
        elif message.request_id in owners:
            per_rank[owners[message.request_id]].append(message)
    return per_rank


class RequestRouter:
    """Collective request hand-over; construct on every rank with the same CPU group."""

    def __init__(self, cpu_group: dist.ProcessGroup | None, front_end_rank: int = 0):
        self.group = cpu_group
        self.rank = 0 if cpu_group is None else dist.get_rank(cpu_group)
        self.world_size = 1 if cpu_group is None else dist.get_world_size(cpu_group)
        self.front_end_rank = front_end_rank
        self.owners: dict[str, int] = {}
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._arrived = threading.Event()
        self._turn = 0
        # Front end: every rank's engine stats as of the last exchange (rank order), for group-wide metrics.
        self.rank_stats: list[dict[str, float]] = []

    @property
    def is_front_end(self) -> bool:
        return self.rank == self.front_end_rank

    def submit(self, message: Message) -> None:
        """Front end only, any thread: queue a new request or an abort for the next exchange."""
        if not self.is_front_end:
            raise RuntimeError(f"requests enter through rank {self.front_end_rank}, not rank {self.rank}")
        self._inbox.put(message)
        self._arrived.set()

    def wake(self) -> None:
        """Front end, any thread: end a `wait_for_inbox` now (something other than a message arrived)."""
        self._arrived.set()

    def wait_for_inbox(self, timeout_s: float) -> bool:
        """Front end: block until something was submitted or `timeout_s` passed (returns whether it was)."""
        arrived = self._arrived.wait(timeout_s)
        self._arrived.clear()
        return arrived or not self._inbox.empty()

    def exchange(
        self,
        load: int,
        outputs: list[Any],
        deliver: Callable[[int, list[Any]], None] | None = None,
        stats: dict[str, float] | None = None,
    ) -> list[Message]:
        """Every rank, every step: report `load`, last step's `outputs` and `stats` (this rank's
        `LLMEngine.stats()`); get this rank's new messages. The front end keeps every rank's `stats` in
        `rank_stats`.

        On the front end, `deliver(rank, outputs)` is called for every rank's outputs (e.g. to push them into
        per-request queues of the HTTP server). Outputs of finished requests should carry their id so the
        front end can forget the owner (`finished(request_id)`).
        """
        if self.group is None or self.world_size == 1:
            inbox = self._drain()
            self.rank_stats = [dict(stats or {})]
            if deliver is not None:
                deliver(0, outputs)
            return route_messages(inbox, [load], self.owners)[0]
        gathered: list[Any] | None = [None] * self.world_size if self.is_front_end else None
        dist.gather_object((load, outputs, stats or {}), gathered, dst=self.front_end_rank, group=self.group)
        scattered: list[Any] | None = None
        if self.is_front_end:
            assert gathered is not None
            if deliver is not None:
                for rank, (_, rank_outputs, _) in enumerate(gathered):
                    deliver(rank, rank_outputs)
            self.rank_stats = [rank_stats for _, _, rank_stats in gathered]
            loads = [rank_load for rank_load, _, _ in gathered]
            scattered = route_messages(self._drain(), loads, self.owners, self._turn)
            self._turn += 1
        received: list[Any] = [None]
        dist.scatter_object_list(received, scattered, src=self.front_end_rank, group=self.group)
        return received[0]

    def finished(self, request_id: str) -> None:
        """Front end: a request is done; later aborts for it are dropped."""
        self.owners.pop(request_id, None)

    def _drain(self) -> list[Message]:
        drained: list[Message] = []
        while True:
            try:
                drained.append(self._inbox.get_nowait())
            except queue.Empty:
                return drained
