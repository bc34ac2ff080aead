"""Step progress: GET /health/progress detects a hung engine, which /health (the socket answers) cannot.

The engine client marks the clock whenever an engine step delivers outputs (or errors) and when work arrives
at an idle engine. The route answers 503 when requests are waiting but nothing was delivered for
`timeout_s` (a stuck NCCL collective, a hung kernel, a dead peer the watchdog missed); otherwise 200. An
idle engine is always healthy. The operator points the engine pods' liveness probe at it
(moefleet.operator.pod_defaults), so the kubelet restarts a hung engine (and the operator its group).

The timeout is MOEFLEET_PROGRESS_TIMEOUT seconds (default DEFAULT_TIMEOUT_S: far above the longest step,
a chunked prefill of a few seconds on a loaded group).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

DEFAULT_TIMEOUT_S = 300.0
PATH = "/health/progress"


class ProgressClock:
    """When the engine last made progress (monotonic seconds); thread-safe enough (one float)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.last = clock()

    def mark(self) -> None:
        with self._lock:
            self.last = self._clock()

    def stalled_for(self, pending: int) -> float:
        """Seconds without progress while `pending` requests wait (0.0 when nothing waits)."""
        if pending <= 0:
            return 0.0
        with self._lock:
            return max(self._clock() - self.last, 0.0)


def timeout_from_environment() -> float:
    value = os.environ.get("MOEFLEET_PROGRESS_TIMEOUT", "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"MOEFLEET_PROGRESS_TIMEOUT={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"MOEFLEET_PROGRESS_TIMEOUT={value!r} must be > 0 seconds")
    return seconds


def make_router(client: Any, timeout_s: float | None = None) -> Any:
    """GET /health/progress over an engine client with `progress` (ProgressClock) and `pending()`."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse
    from moefleet.engine.server.errors import error_body

    limit = timeout_from_environment() if timeout_s is None else timeout_s
    router = APIRouter()

    @router.get(PATH)
    async def progress() -> JSONResponse:
        clock = getattr(client, "progress", None)
        pending = client.pending() if hasattr(client, "pending") else 0
        stalled = clock.stalled_for(pending) if clock is not None else 0.0
        if stalled > limit:
            message = (
                f"the engine made no progress for {stalled:.0f} s with {pending} request(s) waiting "
                f"(limit {limit:g} s): it is hung; restart it"
            )
            return JSONResponse(error_body(message, 503), status_code=503)
        return JSONResponse({"status": "ok", "pending": pending, "stalled_seconds": round(stalled, 3)})

    return router
