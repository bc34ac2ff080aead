"""Graceful drain of `moefleet serve`: what Kubernetes' SIGTERM (every rollout and scale-down) should do.

On the first SIGTERM / SIGINT the server stops accepting work: new requests get 503 with an OpenAI error body
and /health turns not-ready at once (request_guard.py answers both), while requests in flight keep streaming.
When the last one ends, or after `--drain-timeout` seconds, whatever is left is aborted in the engine (its
stream ends with finish_reason "abort"), the HTTP server stops and the group shuts down in order; the process
exits 0. A second signal forces the same path now; if even that does not finish within FORCE_EXIT_S, the
process exits hard (code EXIT_FORCED).

`drain_action` is the pure decision; `Drain` is the state shared by the signal handler, the request guard
and the serve loop (serve_command._serve).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0
ABORT_FLUSH_S = 5.0  # after aborting, how long aborted streams get to send their last chunk
FORCE_EXIT_S = 15.0  # after a second signal, the longest an orderly stop may still take
EXIT_FORCED = 1

SERVE, WAIT, ABORT, STOP = "serve", "wait", "abort", "stop"


def drain_action(now: float, started_at: float | None, timeout_s: float, in_flight: int, forced: bool) -> str:
    """Pure: SERVE (no drain), STOP (nothing in flight), ABORT (forced or past the timeout) or WAIT."""
    if started_at is None:
        return SERVE
    if in_flight <= 0:
        return STOP
    if forced or now - started_at >= timeout_s:
        return ABORT
    return WAIT


class Drain:
    """Drain state of one server process. `begin` is safe from a signal handler or any thread."""

    def __init__(
        self,
        timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        name: str = "moefleet serve",
    ):
        if timeout_s < 0:
            raise ValueError(f"drain timeout must be >= 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self.name = name  # the command that drains, in its log lines
        self._clock = clock
        self._lock = threading.Lock()
        self.started_at: float | None = None
        self.forced = False
        self.in_flight = 0  # requests inside the app (changed on the event loop only)
        self.signals = 0
        self.listeners: list[
            Callable[[bool], None]
        ] = []  # called with `forced` on begin (e.g. tell the group)

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def begin(self, force: bool = False) -> None:
        """Start draining (idempotent); `force` aborts what is in flight now."""
        with self._lock:
            first = self.started_at is None
            if first:
                self.started_at = self._clock()
            if force and not self.forced:
                self.forced = True
            elif not first:
                return
        if force:
            _hard_exit_later(FORCE_EXIT_S, self.name)
        print(
            f"{self.name}: {'forced stop: aborting requests in flight' if force else 'draining'} "
            f"({self.in_flight} request(s) in flight, drain timeout {self.timeout_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
        for listener in list(self.listeners):
            try:
                listener(force)
            except Exception:
                logger.exception("drain listener failed")

    def on_signal(self) -> None:
        """This process's first signal drains, its second forces. A drain begun otherwise (another node of the
        group asked) does not count: Kubernetes signals every pod of a group at about the same time."""
        self.signals += 1
        self.begin(force=self.signals >= 2)

    def action(self) -> str:
        return drain_action(self._clock(), self.started_at, self.timeout_s, self.in_flight, self.forced)


def _hard_exit_later(delay_s: float, name: str = "moefleet serve") -> None:
    def run() -> None:
        time.sleep(delay_s)
        print(
            f"{name}: did not stop within {delay_s:g} s of the forced stop; exiting now "
            f"(exit code {EXIT_FORCED})",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_FORCED)

    threading.Thread(target=run, name="moefleet-force-exit", daemon=True).start()


def abort_in_flight(client: Any) -> int:
    """Abort every request the engine client still runs; how many."""
    abort_all = getattr(client, "abort_all", None)
    return int(abort_all()) if abort_all is not None else 0
