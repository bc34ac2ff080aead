"""If one rank dies, the others exit promptly with a clear log line instead of hanging.

A group is all-or-nothing (the operator restarts it as a whole), so the right reaction to a lost peer is to
exit non-zero quickly. Three layers:
- the process group timeout (`init_distributed(collective_timeout_s=...)`) bounds any collective;
- `Watchdog`, a daemon thread on its own TCPStore client: every rank bumps its heartbeat counter each
  interval; a rank whose counter stops moving for `timeout_s` (or a store that stops answering, i.e. rank 0
  is gone) makes every survivor log and `os._exit(EXIT_CODE)`. Counters, not timestamps, so clocks of
  different nodes need not agree. It works while the main thread is stuck inside a collective, which
  Python code cannot interrupt.
- `fatal(reason)` / `guard()`: a rank that hits an error posts the reason under the store's abort key, so
  the others exit with the first cause instead of a secondary "connection closed" error.
An orderly stop is not a failure: once the front end announced the shutdown (shutdown.py), silent peers and a
vanished store no longer make a rank exit 17. The watchdog also relays drain requests of other nodes to
`on_drain` (set on the front end).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.distributed as dist
from moefleet.engine.distributed.groups import ABORT_KEY
from moefleet.engine.distributed.shutdown import DRAIN_KEY, FORCE, SHUTDOWN_KEY
from moefleet.engine.topology import Topology

logger = logging.getLogger(__name__)

EXIT_CODE = 17  # distinct from crashes (1) and signals (128+n): "a peer failed, restart the whole group"
HEARTBEAT_PREFIX = "moefleet/heartbeat/"


def stale_ranks(last_change: dict[int, float], now: float, timeout_s: float) -> list[int]:
    """Pure: ranks whose heartbeat counter has not moved for longer than `timeout_s`."""
    return sorted(rank for rank, changed in last_change.items() if now - changed > timeout_s)


def _exit(message: str) -> None:
    logger.critical(message)
    # Also straight to stderr: logging may be unconfigured, and os._exit skips every flush.
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


class Watchdog:
    """Heartbeat monitor for one rank. `start()` after `init_distributed`; `stop()` before a clean exit."""

    def __init__(self, launch: Topology, interval_s: float = 1.0, timeout_s: float = 10.0):
        if timeout_s <= interval_s:
            raise ValueError(
                f"watchdog timeout_s ({timeout_s}) must be larger than interval_s ({interval_s})"
            )
        self.launch, self.interval_s, self.timeout_s = launch, interval_s, timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: dist.TCPStore | None = None
        # Front end: called (from the watchdog thread) with force=True/False when another node asks to drain.
        self.on_drain: Callable[[bool], None] | None = None
        self.group_stopping = False  # the front end announced an orderly shutdown

    def _connect(self) -> dist.TCPStore:
        # Own client connection: the main thread's store may be busy inside a blocking call.
        return dist.TCPStore(
            self.launch.master_addr,
            self.launch.master_port,
            self.launch.world_size,
            False,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )

    def start(self) -> Watchdog:
        self._store = self._connect()
        self._thread = threading.Thread(target=self._run, name="moefleet-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 2)

    def _leave(self, message: str) -> None:
        if self.launch.rank == 0:
            # Rank 0 hosts the store: give the others a few intervals to read the reason before it goes.
            time.sleep(3 * self.interval_s)
        _exit(
            f"moefleet: rank {self.launch.rank} exiting: {message}; exit code {EXIT_CODE}, restart the group whole"
        )

    def _run(self) -> None:
        store = self._store
        assert store is not None
        me, world = self.launch.rank, self.launch.world_size
        keys = [f"{HEARTBEAT_PREFIX}{rank}" for rank in range(world)]
        last_value: dict[int, int] = {}
        last_change = {rank: time.monotonic() for rank in range(world) if rank != me}
        master = f"{self.launch.master_addr}:{self.launch.master_port}"
        while not self._stop.is_set():
            try:
                store.add(keys[me], 1)
                if store.check([ABORT_KEY]):
                    self._leave(f"the group is going down: {store.get(ABORT_KEY).decode()}")
                if not self.group_stopping and store.check([SHUTDOWN_KEY]):
                    self.group_stopping = True
                if self.on_drain is not None and store.check([DRAIN_KEY]):
                    on_drain, self.on_drain = self.on_drain, None  # once; "force" may follow "drain"
                    forced = store.get(DRAIN_KEY).decode() == FORCE
                    on_drain(forced)
                    if not forced:
                        self.on_drain = _on_force_only(on_drain)
                # add(key, 0) reads a counter without blocking on keys a rank has not written yet.
                values = {rank: store.add(keys[rank], 0) for rank in last_change}
            except Exception as exc:  # the store lives in rank 0: it is gone or unreachable
                if self._stop.is_set() or self.group_stopping:
                    return  # an orderly stop: rank 0 took the store down on its way out
                self._leave(
                    f"lost the group's rendezvous store at {master} (rank 0 on node 0 died, is unreachable or "
                    f"is going down: {exc})"
                )
            now = time.monotonic()
            for rank, value in values.items():
                if last_value.get(rank) != value:
                    last_value[rank] = value
                    last_change[rank] = now
            dead = [] if self.group_stopping else stale_ranks(last_change, now, self.timeout_s)
            if dead:
                nodes = sorted({rank // self.launch.nproc_per_node for rank in dead})
                message = f"rank(s) {dead} on node(s) {nodes} stopped heartbeating for more than {self.timeout_s:g} s"
                try:
                    store.set(ABORT_KEY, message)
                except Exception:
                    pass
                self._leave(message)
            self._stop.wait(self.interval_s)


def _on_force_only(on_drain: Callable[[bool], None]) -> Callable[[bool], None]:
    """After a plain drain request, only a later "force" is news."""

    def relay(forced: bool) -> None:
        if forced:
            on_drain(True)

    return relay


def fatal(store: dist.Store | None, rank: int, reason: str) -> None:
    """Post `reason` so every rank's watchdog exits with it, then exit this rank."""
    message = f"rank {rank} failed: {reason}"
    if store is not None:
        try:
            if not store.check([ABORT_KEY]):
                store.set(ABORT_KEY, message)
            else:
                message = f"{message} (after: {store.get(ABORT_KEY).decode()})"
        except Exception:
            pass
    _exit(f"moefleet: {message}; exit code {EXIT_CODE}, restart the group whole")


@contextmanager
def guard(store: dist.Store | None, rank: int) -> Iterator[None]:
    """Run a rank's main loop: any exception (e.g. a collective failing because a peer died) becomes
    `fatal` with the error text, instead of a traceback on one rank and a hang on the others."""
    try:
        yield
    except Exception as exc:
        fatal(store, rank, f"{type(exc).__name__}: {exc}")
