"""RelayResponse: the ASGI response that streams a relayed answer to the client, with a cheap disconnect watch.

Starlette's StreamingResponse, under an ASGI 2.3 server such as uvicorn (whose `send` silently drops what comes
after a client disconnect), runs the body in an anyio task group next to a listener task: two tasks, a task
group and cancel scopes per response, a visible share of the gateway's CPU per request. The relay needs less:
the body is iterated in the request's own task, and one plain asyncio task waits on `receive()` for
`http.disconnect`; its done-callback cancels the request's task. The CancelledError that cancel raises at the
body's current await runs the body's `finally` (engine/gateway/app.py `_stream`: its shielded cleanup closes the
upstream connection, so the engine aborts the request and frees its KV), and the response then returns quietly,
as StreamingResponse does. Any other cancellation (the DrainGuard's cut, a shutdown) propagates unchanged.

Headers, status and framing are the same as StreamingResponse's (a Starlette Response subclass: FastAPI
returns it as is).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class RelayResponse(Response):
    """Stream `body` (bytes chunks) as the response; a client disconnect stops it and closes `body`."""

    def __init__(self, body: AsyncIterator[bytes], status_code: int = 200, media_type: str | None = None):
        self.body_iterator = body
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = ended = False

        def on_watch_done(watch: asyncio.Task[None]) -> None:
            nonlocal gone
            if ended or watch.cancelled() or watch.exception() is not None:
                return  # the response is over (a callback already queued), or receive() failed: nothing to cut
            gone = True
            task.cancel()

        watch = asyncio.ensure_future(_disconnected(receive))
        watch.add_done_callback(on_watch_done)
        body = self.body_iterator
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Ours (the client left) when no other cancel is pending on this task: end quietly like
            # StreamingResponse. Anything else (the drain's cut, shutdown) goes on up.
            if not gone or task.uncancel() > 0:
                raise
        finally:
            ended = True
            watch.remove_done_callback(on_watch_done)
            watch.cancel()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:  # the body stopped at a yield (cancelled in send): run its finally now
                await aclose()


async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects (request body messages still unread are skipped)."""
    while (await receive())["type"] != "http.disconnect":
        pass
