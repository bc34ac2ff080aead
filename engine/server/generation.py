"""One request's generation as the HTTP layer sees it: engine outputs, metrics, errors, client disconnects.

`Generation.next()` returns the next engine output, or raises `ClientDisconnected` as soon as the HTTP
client goes away (the request is then aborted in the engine, freeing its KV blocks), or an `OpenAIError`
carrying the right status when the engine rejects or fails the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from moefleet.engine.server.async_engine import (
    EngineClient,
    EngineDeadError,
    EngineError,
    RequestRejectedError,
)
from moefleet.engine.server.errors import OpenAIError
from moefleet.engine.server.metrics import ServerMetrics
from starlette.requests import Request

T = TypeVar("T")


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
    """Drives `client.generate` for one request and records its metrics exactly once."""

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
        self._watcher = asyncio.ensure_future(_wait_for_disconnect(request)) if request is not None else None
        self.finished = False

    async def next(self) -> Any:
        """The next RequestOutput; after one with `finished`, do not call again."""
        try:
            output = await self._until_disconnect(self._outputs.__anext__())
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
        except BaseException:  # disconnect or cancellation: abort in the engine
            await self._end("abort")
            raise
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
        if self._watcher is not None:
            self._watcher.cancel()
        # Closing the engine stream aborts the request there when it has not finished.
        with contextlib.suppress(Exception):
            await self._outputs.aclose()  # type: ignore[attr-defined]
        self._tracker.finish(finish_reason)

    async def _until_disconnect(self, awaitable: Awaitable[T]) -> T:
        task = asyncio.ensure_future(awaitable)
        if self._watcher is None:
            return await task
        try:
            await asyncio.wait({task, self._watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # we were cancelled (e.g. the server shuts the stream down)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientDisconnected(self.request_id)
