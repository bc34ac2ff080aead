"""`EngineClient` of a node that is not the group's front end (node rank > 0, local rank 0).

Such a node takes no requests, but Kubernetes probes every pod's `/health`. So it serves the same app
(its `/metrics` has no load gauges: the group's front end exports the whole group's, so a sum over pods
counts every request once): `/health` answers 200 while its rank steps, and the
completion routes answer 503 saying where requests go. When the front end shuts the group down, the loop
ends and `finished` is set so the HTTP server stops too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from moefleet.engine.server.async_engine import EngineDeadError, StreamingEngineClient

logger = logging.getLogger(__name__)


class WorkerNodeClient(StreamingEngineClient):
    """Runs a non-front-end rank's `DPEngineLoop` in a thread; exposes only health and load."""

    _thread_name = "moefleet-worker-rank"

    def __init__(self, loop: Any, front_end_address: str, state: Any = None):
        engine = loop.engine
        self._state = state  # ProcessGroups: a failing rank posts its reason and exits (watchdog.guard)
        super().__init__(
            engine.tokenizer, int(engine.config.max_model_len), getattr(engine, "vocab_size", None)
        )
        self._loop = loop
        self._front_end_address = front_end_address
        self._stats = dict(engine.stats())
        self.finished = threading.Event()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: Any
    ) -> AsyncIterator[Any]:
        raise EngineDeadError(
            f"this node is not the front end of its serving group; send requests to node 0 "
            f"({self._front_end_address}, the group's first pod)"
        )
        yield  # pragma: no cover - makes this an async generator like the other clients

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any) -> None:
        raise AssertionError("unreachable: generate() refuses every request")

    def abort(self, request_id: str) -> None:
        pass

    def _request_stop(self) -> None:
        raise AssertionError("unreachable: shutdown() is overridden; only the front end stops the group")

    def shutdown(self, timeout: float = 1.0) -> None:
        # Only the front end can stop the group; a worker leaving early is handled by the caller.
        if self._thread is not None:
            self._thread.join(timeout)

    def rank_stats(self) -> list[dict[str, float]]:
        return []  # the front end's /metrics covers this rank

    @property
    def loop_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        from contextlib import nullcontext

        from moefleet.engine.distributed.watchdog import guard

        state = self._state
        try:
            # A group is all-or-nothing: with a state, an error exits this process after telling the others.
            with guard(state.store, state.rank) if state is not None else nullcontext():
                while self._loop.step():
                    self._stats = dict(self._loop.engine.stats())
        except BaseException as exc:  # without a state (tests): report through /health instead
            logger.exception("worker rank loop failed")
            self._dead = exc
        finally:
            self.finished.set()
