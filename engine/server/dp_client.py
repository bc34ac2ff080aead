"""`EngineClient` of the front-end rank of a data-parallel group.

Every rank runs a `DPEngineLoop` (engine/distributed/engine_glue.py); on the front-end rank that loop runs in
a background thread of the HTTP server process. New requests and aborts go to `loop.router.submit` (thread
safe); the router places each request on the least-loaded rank at the next step boundary and brings every
rank's outputs back, which this client routes to the per-request queues. The HTTP layer does not change.

Load gauges show the front-end rank's own engine (each rank exports its own KV usage in the target design);
if the loop fails, every in-flight request gets an error and the client is marked dead (`/health` 503),
because a group that lost a collective cannot continue.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from moefleet.engine.server.async_engine import EngineDeadError, StreamingEngineClient

logger = logging.getLogger(__name__)


class DPEngineClient(StreamingEngineClient):
    """Front end over a `DPEngineLoop` whose router is the front-end rank's."""

    def __init__(self, loop: Any, max_model_len: int | None = None, vocab_size: int | None = None):
        engine = loop.engine
        if not loop.router.is_front_end:
            raise ValueError(f"DPEngineClient must run on the front-end rank, not rank {loop.router.rank}")
        super().__init__(
            engine.tokenizer,
            max_model_len if max_model_len is not None else engine.config.max_model_len,
            vocab_size if vocab_size is not None else getattr(engine, "vocab_size", None),
        )
        self._loop = loop
        loop.on_outputs = self._deliver_outputs
        self._stats = dict(engine.stats())
        self._thread: threading.Thread | None = None

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any) -> None:
        from moefleet.engine.distributed.request_router import AddRequest

        # cost: tokens the request brings, so placement before the next load report is roughly fair
        cost = len(prompt_token_ids) + int(getattr(sampling_params, "max_tokens", 1))
        self._loop.router.submit(AddRequest(request_id, (prompt_token_ids, sampling_params), cost=cost))

    def abort(self, request_id: str) -> None:
        from moefleet.engine.distributed.request_router import AbortRequest

        if self._dead is None:
            self._loop.router.submit(AbortRequest(request_id))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moefleet-dp-front-end", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Tell every rank to leave its loop (they exit after the next exchange), then wait for ours."""
        from moefleet.engine.distributed.request_router import Shutdown

        if self._thread is not None:
            if self._dead is None:
                self._loop.router.submit(Shutdown())
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        try:
            while self._loop.step():
                self._stats = dict(self._loop.engine.stats())
            self._fail_all(EngineDeadError("the server is shutting down"))
        except BaseException as exc:  # a failed collective leaves the group unusable
            logger.exception("data-parallel serving loop failed")
            self._dead = exc
            self._fail_all(EngineDeadError(f"the data-parallel group failed: {type(exc).__name__}: {exc}"))
