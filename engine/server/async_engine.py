"""Bridge between the asyncio HTTP server and the (synchronous, not thread-safe) engine.

`EngineClient` is what the HTTP layer talks to: submit a request and stream its outputs, abort it, read load
statistics. `StreamingEngineClient` holds the per-request output queues; `LocalEngineClient` drives one
`LLMEngine` from one background thread, and `DPFrontEndClient` (engine/entrypoints/dp_client.py) a whole
data-parallel group from its front-end rank.

Threading model of `LocalEngineClient`:
- HTTP handlers (event loop thread) put ("add" | "abort") commands on a thread-safe queue.
- The engine thread drains the queue, runs `engine.step()` while there is work, and blocks on the queue when
  there is none (no busy spin).
- Each request's outputs go to its own asyncio.Queue via `loop.call_soon_threadsafe` (one call per step).
- If `step()` raises, every in-flight request receives an `EngineError` (never a hang); requests are
  aborted in the engine, and if even that fails the client is marked dead (health turns 503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from moefleet.engine.server.progress import ProgressClock

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running a request (HTTP 500)."""


class EngineDeadError(EngineError):
    """The engine can no longer serve (HTTP 503); the process should be restarted."""


class RequestRejectedError(ValueError):
    """The engine refused a request at admission (HTTP 400), e.g. a prompt its config cannot hold."""


class NoRoomError(RequestRejectedError):
    """A valid request the engine has no room for now (a decode server's KV cache is full): HTTP 503 with code
    `kv_cache_full`, which the gateway takes as "try another group" (engine/gateway/pd.py)."""


class EngineClient(ABC):
    """What the HTTP server needs from an engine, local or spread over data-parallel ranks."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int | None = None  # token-id prompts are checked against it when known

    @abstractmethod
    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: Any
    ) -> AsyncIterator[Any]:
        """Submit a request and yield its `RequestOutput`s until one has `finished`.

        Closing the iterator early (client gone, task cancelled) aborts the request in the engine.
        """

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished). Safe to call from any thread."""

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Latest load snapshot: num_running, num_waiting, kv_blocks_used, kv_blocks_total, kv_usage."""

    def rank_stats(self) -> list[dict[str, float]]:
        """Latest snapshot of every DP rank this client exports (`/metrics` sums them); one engine here."""
        return [self.stats()]

    @property
    @abstractmethod
    def dead_error(self) -> BaseException | None:
        """Why the engine cannot serve any more, or None while it is healthy."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (idempotent)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; in-flight requests get an error."""


@dataclass
class _Stream:
    """Per-request delivery channel from the engine thread into the request's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for target, item in items:
        target.put_nowait(item)


_STOP = ("stop",)


class StreamingEngineClient(EngineClient):
    """Per-request output queues shared by engine clients whose engine runs in a background thread.

    Subclasses hand requests to their engine (`_submit_add`, `abort`) and call `_deliver` / `_fail_all`
    from the engine thread; `generate`, the engine thread (`start` runs `_run`) and the bookkeeping live here.
    """

    _thread_name = "moefleet-engine"
    _thread: threading.Thread | None = None

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int | None):
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len)
        self.vocab_size = vocab_size
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stats: dict[str, float] = {}
        self._dead: BaseException | None = None
        self.progress = ProgressClock()  # GET /health/progress (progress.py): marked on every delivery

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._request_stop()
            self._thread.join(timeout)
            self._thread = None

    @abstractmethod
    def _run(self) -> None:
        """The engine thread's body (runs until shutdown or failure)."""

    @abstractmethod
    def _request_stop(self) -> None:
        """Ask the engine thread to leave `_run` (in-flight requests get an error)."""

    @abstractmethod
    def _submit_add(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any) -> None:
        """Hand a new request to the engine thread (called on the event loop)."""

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: Any
    ) -> AsyncIterator[Any]:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise RequestRejectedError(f"request id {request_id} is already in use")
            if not self._streams:  # work arrives at an idle engine: the stall clock starts now
                self.progress.mark()
            self._streams[request_id] = stream
        self._submit_add(request_id, list(prompt_token_ids), sampling_params)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine thread already dropped this request
                    raise item
                finished = bool(item.finished)
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # client went away or the consumer stopped early
                self.abort(request_id)

    def stats(self) -> dict[str, float]:
        return self._stats

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def pending(self) -> int:
        """Requests in flight (waiting for or receiving outputs)."""
        with self._lock:
            return len(self._streams)

    def _in_flight(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def abort_all(self) -> int:
        """Abort every request in flight (drain timeout, forced stop); each ends with finish_reason "abort".
        Returns how many were asked to stop."""
        request_ids = self._in_flight()
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    def _deliver(self, request_id: str, item: Any, last: bool) -> None:
        self._deliver_all([(request_id, item, last)])

    def _deliver_outputs(self, outputs: list[Any]) -> None:
        self._deliver_all((output.request_id, output, bool(output.finished)) for output in outputs)

    def _deliver_all(self, deliveries: Iterable[tuple[str, Any, bool]]) -> None:
        """Hand (request_id, output or error, last) items to their streams; `last` ends the stream."""
        # One wake-up of each event loop per step, not one per output: at hundreds of running sequences
        # the per-call overhead (self-pipe write, GIL hand-over) is what the HTTP side pays per token.
        self.progress.mark()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for request_id, item, last in deliveries:
                stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _fail_all(self, error: BaseException) -> None:
        self.progress.mark()
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)


class LocalEngineClient(StreamingEngineClient):
    """One in-process `LLMEngine` driven by a dedicated thread."""

    def __init__(self, engine: Any, max_model_len: int | None = None, vocab_size: int | None = None):
        config: Any = getattr(engine, "config", None)
        if vocab_size is None:
            vocab_size = getattr(engine, "vocab_size", None)
        if vocab_size is None and config is not None:
            vocab_size = getattr(config, "hf_config", {}).get("vocab_size")
        super().__init__(
            engine.tokenizer, max_model_len if max_model_len is not None else config.max_model_len, vocab_size
        )
        self._engine = engine
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._stats = dict(engine.stats())

    def _submit_add(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any) -> None:
        self._commands.put(("add", request_id, prompt_token_ids, sampling_params))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def _request_stop(self) -> None:
        self._commands.put(_STOP)

    # ---- engine-thread side --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                # Block when idle; otherwise take whatever arrived since the last step.
                command = self._commands.get() if not self._has_work() else self._next_command()
                while command is not None:
                    if command is _STOP:
                        self._fail_all(EngineDeadError("the server is shutting down"))
                        return
                    self._handle(command)
                    command = self._next_command()
                if self._has_work():
                    self._step()
                self._refresh_stats()
        except BaseException as exc:  # a bug in this loop must not leave clients waiting forever
            logger.exception("engine loop crashed")
            self._dead = exc
            self._fail_all(EngineDeadError(f"engine loop crashed: {type(exc).__name__}: {exc}"))

    def _next_command(self) -> tuple | None:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _has_work(self) -> bool:
        return self._dead is None and bool(self._engine.has_unfinished_requests())

    def _handle(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_token_ids, sampling_params = command
            if self._dead is not None:
                self._deliver(
                    request_id, EngineDeadError(f"the engine is not running: {self._dead}"), last=True
                )
                return
            try:
                self._engine.add_request(request_id, prompt_token_ids, sampling_params)
            except (ValueError, TypeError) as exc:
                self._deliver(request_id, RequestRejectedError(str(exc)), last=True)
            except Exception as exc:
                logger.exception("add_request failed for %s", request_id)
                self._deliver(request_id, EngineError(f"{type(exc).__name__}: {exc}"), last=True)
        elif command[0] == "abort":
            try:
                self._engine.abort_request(command[1])
            except (KeyError, ValueError):
                pass  # already finished: nothing to free

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:
            logger.exception("engine step failed")
            self._recover_from_step_failure(exc)
            return
        self._deliver_outputs(outputs)

    def _recover_from_step_failure(self, exc: Exception) -> None:
        error = EngineError(f"the engine failed while running this request: {type(exc).__name__}: {exc}")
        request_ids = self._in_flight()
        self._fail_all(error)
        try:
            for request_id in request_ids:
                try:
                    self._engine.abort_request(request_id)
                except (KeyError, ValueError):
                    pass
        except Exception as abort_exc:
            self._dead = abort_exc
            logger.exception("could not abort requests after a failed step; the engine is marked dead")

    def _refresh_stats(self) -> None:
        try:
            self._stats = dict(self._engine.stats())
        except Exception:  # stats are best effort; serving goes on
            logger.exception("engine.stats() failed")
