"""One request's generation as the HTTP layer sees it: engine outputs, metrics, errors, client disconnects.

`Generation.next()` returns the next engine output, or raises `ClientDisconnected` as soon as the HTTP
client goes away (the request is then aborted in the engine, freeing its KV blocks), or an `OpenAIError`
carrying the right status when the engine rejects or fails the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from moefleet.engine.server.async_engine import (
    EngineClient,
    EngineDeadError,
    EngineError,
    NoRoomError,
    RequestRejectedError,
)
from moefleet.engine.server.errors import KV_CACHE_FULL_CODE, OpenAIError
from moefleet.engine.server.metrics import ServerMetrics
from starlette.requests import Request


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the response was complete."""


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message is the disconnect (or the end of the
    # response cycle, after which nobody waits on this any more).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Generation:
    """Drives `client.generate` for one request and records its metrics exactly once.

    Disconnects are watched by one task per request; when the client goes away while the consumer waits in
    `next()`, the watcher cancels the consumer, which turns the cancellation into `ClientDisconnected`
    (no extra task per token).
    """

    def __init__(
        self,
        client: EngineClient,
        metrics: ServerMetrics,
        request: Request | None,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Any,
    ):
        self.request_id = request_id
        self._outputs = client.generate(request_id, prompt_token_ids, sampling_params)
        self._tracker = metrics.track()
        self._tracker.prompt_tokens = len(prompt_token_ids)
        self._consumer: asyncio.Task | None = None
        self._disconnected = False
        self._watcher = asyncio.ensure_future(self._watch(request)) if request is not None else None
        self.finished = False

    async def _watch(self, request: Request) -> None:
        await _wait_for_disconnect(request)
        self._disconnected = True
        if self._consumer is not None and not self.finished:
            self._consumer.cancel()

    async def next(self) -> Any:
        """The next RequestOutput; after one with `finished`, do not call again."""
        if self._disconnected:
            await self._end("abort")
            raise ClientDisconnected(self.request_id)
        self._consumer = asyncio.current_task()
        try:
            output = await self._outputs.__anext__()
        except asyncio.CancelledError:
            await self._end("abort")  # closing the engine stream aborts the request there
            if self._disconnected:  # our watcher cancelled us: not a real cancellation of the task
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                raise ClientDisconnected(self.request_id) from None
            raise
        except NoRoomError as exc:
            await self._end("error")
            raise OpenAIError(str(exc), status_code=503, code=KV_CACHE_FULL_CODE) from exc
        except RequestRejectedError as exc:
            await self._end("error")
            raise OpenAIError(str(exc), status_code=400) from exc
        except EngineDeadError as exc:
            await self._end("error")
            raise OpenAIError(str(exc), status_code=503) from exc
        except EngineError as exc:
            await self._end("error")
            raise OpenAIError(str(exc), status_code=500) from exc
        except StopAsyncIteration as exc:  # the client implementation ended without a finished output
            await self._end("error")
            raise OpenAIError("the engine ended the request without a result", status_code=500) from exc
        except BaseException:
            await self._end("abort")
            raise
        finally:
            self._consumer = None
        self._tracker.on_output(len(output.new_token_ids))
        if output.finished:
            self._tracker.prompt_tokens = output.num_prompt_tokens
            await self._end(output.finish_reason or "stop")
        return output

    async def close(self) -> None:
        """End early (idempotent): aborts the request in the engine if it is still running."""
        await self._end("abort")

    async def _end(self, finish_reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        # Closing the engine stream aborts the request there when it has not finished.
        with contextlib.suppress(Exception):
            await self._outputs.aclose()  # type: ignore[attr-defined]
        self._tracker.finish(finish_reason)


class GenerationGroup:
    """The engine requests of one HTTP request (n choices, several prompts): `next()` returns
    (member index, output) from whichever member produced next, until every member finished.

    One disconnect watcher serves the group; each member aborts its engine request when the group closes
    early. With one member, outputs are read directly (no extra task per token)."""

    def __init__(
        self,
        client: EngineClient,
        metrics: ServerMetrics,
        request: Request | None,
        members: list[tuple[str, list[int], Any]],
    ):
        self.members = [Generation(client, metrics, None, rid, ids, params) for rid, ids, params in members]
        self._remaining = len(self.members)
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._consumer: asyncio.Task | None = None
        self._disconnected = False
        self.finished = False
        self._watcher = asyncio.ensure_future(self._watch(request)) if request is not None else None

    @property
    def done(self) -> bool:
        """Every member has delivered its finished output."""
        return self._remaining == 0

    async def _watch(self, request: Request) -> None:
        await _wait_for_disconnect(request)
        self._disconnected = True
        if self._consumer is not None and not self.finished:
            self._consumer.cancel()

    async def _pump(self, index: int, generation: Generation) -> None:
        try:
            while True:
                output = await generation.next()
                self._queue.put_nowait((index, output))
                if output.finished:
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # delivered to the consumer, which closes the group
            self._queue.put_nowait((index, exc))

    async def next(self) -> tuple[int, Any]:
        if self._disconnected:
            await self.close()
            raise ClientDisconnected(self.members[0].request_id)
        self._consumer = asyncio.current_task()
        try:
            if len(self.members) == 1:
                index, item = 0, await self.members[0].next()
            else:
                if not self._pumps:
                    self._pumps = [
                        asyncio.ensure_future(self._pump(i, g)) for i, g in enumerate(self.members)
                    ]
                index, item = await self._queue.get()
        except asyncio.CancelledError:
            await self.close()
            if self._disconnected:
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                raise ClientDisconnected(self.members[0].request_id) from None
            raise
        finally:
            self._consumer = None
        if isinstance(item, BaseException):
            await self.close()
            raise item
        if item.finished:
            self._remaining -= 1
        return index, item

    async def close(self) -> None:
        """End early (idempotent): every member still running is aborted in the engine."""
        if self.finished:
            return
        self.finished = True
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        for pump in self._pumps:
            pump.cancel()
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)
        for generation in self.members:
            await generation.close()
