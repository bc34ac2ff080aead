"""ASGI middleware in front of the app: refuse what must not reach a handler, count what is in flight.

- While draining (drain.py): /health answers 503 at once (the pod leaves the Service), every other request
  but /metrics answers 503 with an OpenAI error body; requests already inside keep running.
- Bodies larger than `max_request_bytes` answer 413 before they are read whole (Content-Length checked
  first; chunked bodies counted as they arrive). JSON nested deeper than `max_json_depth` answers 400 before
  any parser sees it. The body is then replayed to the app unchanged, so the disconnect watch of streaming
  requests still sees `http.disconnect`.
- `drain.in_flight` counts requests inside the app (a stream counts until its last byte).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from moefleet.engine.server.drain import Drain

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # a 128k-token prompt as token ids is about 1 MB of JSON
DEFAULT_MAX_JSON_DEPTH = 32  # OpenAI bodies nest 4-6 levels deep (messages -> content parts -> ...)
ALWAYS_OPEN = ("/metrics", "/health/progress")  # scraped while draining; liveness must not kill a drain
HEALTH_PATH = "/health"

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes) -> int:
    """Pure: the deepest nesting of arrays/objects in a JSON text (brackets inside strings do not count;
    malformed text gets a best-effort number and is left for the JSON parser to refuse)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', body)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


class RequestGuard:
    """Wraps an ASGI app (uvicorn serves the guard; lifespan events pass straight through)."""

    def __init__(
        self,
        app: ASGIApp,
        drain: Drain | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
    ):
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
        self.app = app
        self.drain = drain if drain is not None else Drain()
        self.max_request_bytes = max_request_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.drain.draining and path not in ALWAYS_OPEN:
            message = (
                "this server is draining (shutting down) and takes no new requests"
                if path != HEALTH_PATH
                else "draining: not ready for new requests"
            )
            await _respond(send, 503, f"{message}; retry on another replica", {"retry-after": "1"})
            return
        self.drain.in_flight += 1
        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                replay = await self._checked_body(scope, receive, send)
                if replay is None:
                    return
                receive = replay
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1

    async def _checked_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the body under the limits; a receive that replays it, or None when a refusal was sent."""
        limit = self.max_request_bytes
        too_large = (
            f"the request body is larger than this server's limit of {limit} bytes; send a smaller "
            "request (the server's --max-request-bytes sets the limit)"
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _respond(send, 400, "the Content-Length header is not a number")
                    return None
                if declared > limit:
                    await _respond(send, 413, too_large, code="request_too_large")
                    return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _respond(send, 413, too_large, code="request_too_large")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        depth = json_depth(body)
        if depth > self.max_json_depth:
            await _respond(
                send,
                400,
                f"the request body nests JSON {depth} levels deep; this server accepts at most "
                f"{self.max_json_depth}",
                code="json_too_deep",
            )
            return None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _respond(
    send: Send, status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None
) -> None:
    from moefleet.engine.server.errors import error_body  # here: `moefleet --help` must not import fastapi

    payload = json.dumps(error_body(message, status, code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
