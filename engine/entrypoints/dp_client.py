"""The HTTP server's view of a DP group: an `EngineClient` on rank 0, a plain loop on every other rank.

    state = init_distributed(Topology.from_env(), device, hf_config=config.hf_config)
    engine = build_engine(config, state, backend)
    loop = DPEngineLoop(engine, RequestRouter(state.cpu_group))
    if state.rank == 0:
        client = DPFrontEndClient(loop, state)   # hand to the FastAPI app like LocalEngineClient
    else:
        run_worker_rank(loop, state)      # blocks until the front end shuts down; no HTTP on this rank

The front end's engine thread runs `loop.step()` forever: each step hands queued requests/aborts to the
ranks (least-loaded placement), streams every rank's outputs into the per-request queues and keeps every
rank's engine stats, so this rank's `/metrics` describes the whole group.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any

from moefleet.engine.distributed.engine_glue import DPEngineLoop, RequestFailed, RequestRejected
from moefleet.engine.distributed.groups import ProcessGroups
from moefleet.engine.distributed.request_router import AbortRequest, AddRequest, Shutdown
from moefleet.engine.distributed.shutdown import announce_shutdown
from moefleet.engine.distributed.watchdog import fatal, guard
from moefleet.engine.server.async_engine import (
    EngineDeadError,
    EngineError,
    NoRoomError,
    RequestRejectedError,
    StreamingEngineClient,
)
from moefleet.engine.server.metrics import group_stats

logger = logging.getLogger(__name__)


class DPFrontEndClient(StreamingEngineClient):
    """EngineClient over a whole DP group, living on the front-end rank (rank 0)."""

    _thread_name = "moefleet-dp-engine"

    def __init__(self, loop: DPEngineLoop, state: ProcessGroups | None = None, exit_grace_s: float = 1.0):
        """With `state`, a failed loop (a collective failing because a peer died, or a bug) fails every client
        request, then posts the reason to the group and exits this process (code 17) after `exit_grace_s`,
        so the other ranks stop too and the group restarts whole instead of hanging."""
        engine = loop.engine
        super().__init__(engine.tokenizer, int(engine.config.max_model_len or 0), engine.vocab_size)
        if not loop.router.is_front_end:
            raise ValueError(f"DPFrontEndClient must run on rank {loop.router.front_end_rank}")
        self._loop = loop
        self._state, self._exit_grace_s = state, exit_grace_s
        loop.on_outputs = self._on_outputs
        self._rank_stats: list[dict[str, float]] = [dict(engine.stats())]  # until the first exchange
        self._stats = group_stats(self._rank_stats)

    def rank_stats(self) -> list[dict[str, float]]:
        """Every rank's engine stats as of the last step's exchange (rank order); `stats()` is their sum."""
        return self._rank_stats

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any) -> None:
        # cost = prompt length: the load the request adds to its rank until that rank reports again.
        payload = (prompt_token_ids, sampling_params)
        self._loop.router.submit(AddRequest(request_id, payload, cost=max(len(prompt_token_ids), 1)))

    def abort(self, request_id: str) -> None:
        self._loop.router.submit(AbortRequest(request_id))

    def _request_stop(self) -> None:
        """Tell every rank to leave its loop (the engine thread stops after that exchange); announced in the
        store first, so no rank's watchdog takes the orderly stop for a failure (exit 0, not 17)."""
        if self._state is not None:
            announce_shutdown(self._state.store)
        self._loop.router.submit(Shutdown())

    def _on_outputs(self, outputs: list[Any]) -> None:
        # Batched like LocalEngineClient: one event-loop wake-up per rank's outputs, not one per token.
        self._deliver_all(
            (
                output.request_id,
                (NoRoomError if output.no_room else RequestRejectedError)(output.message),
                True,
            )
            if isinstance(output, RequestRejected)
            else (output.request_id, EngineError(output.message), True)
            if isinstance(output, RequestFailed)
            else (output.request_id, output, bool(output.finished))
            for output in outputs
        )

    def _run(self) -> None:
        try:
            while self._loop.step():
                rank_stats = self._loop.router.rank_stats
                if rank_stats is not self._rank_stats:
                    self._rank_stats = rank_stats
                    self._stats = group_stats(rank_stats)
        except BaseException as exc:  # a collective failed (peer gone) or a bug: fail clients, never hang
            logger.exception("DP engine loop stopped")
            self._dead = exc
            self._fail_all(EngineDeadError(f"the DP group stopped: {type(exc).__name__}: {exc}"))
            if self._loop.eplb is not None:  # admin requests waiting for an EPLB command
                self._loop.eplb.fail_pending(EngineDeadError(f"the DP group stopped: {exc}"))
            if self._state is not None:
                time.sleep(self._exit_grace_s)  # let the event loop send the errors to the clients
                fatal(
                    self._state.store,
                    self._state.rank,
                    f"DP engine loop stopped: {type(exc).__name__}: {exc}",
                )
            return
        self._fail_all(EngineDeadError("the server is shutting down"))


def run_worker_rank(loop: DPEngineLoop, state: ProcessGroups | None = None) -> None:
    """A non-front-end rank: step until the front end sends Shutdown. With `state`, a failure is posted to
    the group (watchdog abort key) and the process exits non-zero, so the group restarts whole."""
    with guard(state.store, state.rank) if state is not None else nullcontext():
        while loop.step():
            pass
