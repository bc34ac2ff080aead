"""Graceful drain of `moefleet gateway`, the same contract as `moefleet serve` (engine/server/drain.py).

On the first SIGTERM / SIGINT the gateway stops taking work: /health answers 503 at once and every new request
gets 503 with an OpenAI error body (and `Connection: close`, so the client's retry opens a new connection that
the Service sends to another gateway replica). Requests and streams already relayed keep going, in mixed and
prefill/decode mode alike (the guard wraps the whole app). When the last one ends, or after the drain timeout
(`--drain-timeout`, else the config's `drainTimeoutSeconds`, else 30 s), what is left is cut: a stream ends
with a chunk whose finish_reason is "abort" and `data: [DONE]` (an OpenAI error event when no chunk had come
yet), a request not answered yet gets 503; closing the upstream connection makes the engine abort its side.
Then the gateway exits 0. A second signal cuts everything now (and exits hard after FORCE_EXIT_S at the latest).

`abort_tail` and `drain_timeout_of` are pure; `DrainGuard` is the ASGI middleware; `serve` runs uvicorn under
the drain (the one place with signals).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from moefleet.engine.server import event_loop
from moefleet.engine.server.drain import (
    ABORT,
    ABORT_FLUSH_S,
    DEFAULT_DRAIN_TIMEOUT_S,
    STOP,
    Drain,
    abort_in_flight,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

NAME = "moefleet gateway"
ALWAYS_OPEN = ("/metrics",)  # scraped while draining
HEALTH_PATH = "/health"
REFUSED = (
    "this gateway is draining (shutting down) and takes no new requests; retry the request: through the "
    "gateway's Service another gateway replica takes it"
)
NOT_READY = "draining: this gateway takes no new requests"
CUT_BEFORE_ANSWER = (
    "the gateway stopped (drain timeout reached) before the engine answered this request; retry the request"
)


def drain_timeout_of(flag: float | None, config_seconds: float | None) -> float:
    """Pure: the flag wins, then the gateway config's drainTimeoutSeconds, then the default (30 s, as serve)."""
    if flag is not None:
        return flag
    return config_seconds if config_seconds is not None else DEFAULT_DRAIN_TIMEOUT_S


def _sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def abort_tail(last_body: bytes | None) -> bytes:
    """Pure: the bytes that end a stream cut by the drain, built from the last body the client got.

    A chunk like the last one relayed (same id, object, created, model, choice index) with finish_reason
    "abort", as the engine ends a request it aborts, then [DONE]. When no chunk can be read back (nothing sent
    yet, or the last body held no whole JSON event), an OpenAI error event and [DONE]. A body that stopped
    inside an event (the relay forwards raw bytes) is closed first, so the events that follow stay readable."""
    close = b"\n\n" if last_body and not last_body.endswith(b"\n\n") else b""
    last: dict[str, Any] | None = None
    for line in (last_body or b"").splitlines():
        if line.startswith(b"data: {"):
            try:
                event = json.loads(line[len(b"data: ") :])
            except ValueError:
                continue
            if isinstance(event, dict) and "choices" in event and "error" not in event:
                last = event
    if last is None:
        from moefleet.engine.server.errors import error_body

        message = "the gateway stopped (drain timeout reached) during this stream; retry the request"
        return close + _sse(error_body(message, 503, code="gateway_draining")) + _sse("[DONE]")
    choices = last.get("choices") or [{"index": 0}]
    chat = str(last.get("object", "")).startswith("chat.")
    ended = []
    for choice in choices:
        index = choice.get("index", 0) if isinstance(choice, dict) else 0
        part: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
        ended.append({"index": index, **part, "logprobs": None, "finish_reason": "abort"})
    chunk: dict[str, Any] = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
    chunk["choices"] = ended
    return close + _sse(chunk) + _sse("[DONE]")


class DrainGuard:
    """ASGI middleware over the gateway app: refuses new work while draining, counts and can cut what runs."""

    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain
        self._open: set[anyio.CancelScope] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope.get("path", "") not in ALWAYS_OPEN:
            await _respond(send, REFUSED if scope.get("path") != HEALTH_PATH else NOT_READY)
            return
        state: dict[str, Any] = {"started": False, "ended": False, "sse": False, "last": None}

        async def tracked(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                if state["sse"]:
                    state["last"] = message.get("body")
                if not message.get("more_body", False):
                    state["ended"] = True
            elif kind == "http.response.start":
                state["started"] = True
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        state["sse"] = True
            await send(message)

        cut = anyio.CancelScope()
        self._open.add(cut)
        self.drain.in_flight += 1
        try:
            with cut:
                await self.app(scope, receive, tracked)
            if cut.cancelled_caught and not state["ended"]:
                with anyio.CancelScope(shield=True):
                    await self._end(send, state)
        finally:
            self._open.discard(cut)
            self.drain.in_flight -= 1

    @staticmethod
    async def _end(send: Send, state: dict[str, Any]) -> None:
        """Finish a response cut by the drain, whatever point it had reached."""
        try:
            if not state["started"]:
                await _respond(send, CUT_BEFORE_ANSWER)
            elif state["sse"]:
                await send(
                    {"type": "http.response.body", "body": abort_tail(state["last"]), "more_body": False}
                )
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # the client is gone too
            pass

    def abort_all(self) -> int:
        """Cut every request in flight (drain timeout or forced stop); how many (drain.abort_in_flight)."""
        scopes = list(self._open)
        for cut in scopes:
            cut.cancel()
        return len(scopes)


async def _respond(send: Send, message: str) -> None:
    from moefleet.engine.server.errors import error_body  # here: `moefleet --help` must not import fastapi

    payload = json.dumps(error_body(message, 503, code="gateway_draining")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def serve(app: ASGIApp, host: str, port: int, log_level: str, drain: Drain) -> None:
    """Serve the gateway (wrapped in a DrainGuard here) until its drain ends; SIGTERM/SIGINT drain, not stop."""
    import uvicorn

    guard = DrainGuard(app, drain)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not recorded in _captured_signals: uvicorn would re-raise it after serving (exit 143), not exit 0.
            drain.on_signal()

    config = uvicorn.Config(guard, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = DrainingServer(config)
    try:
        event_loop.run(_serve(server, guard, drain), config)
    except KeyboardInterrupt:  # a Ctrl-C outside uvicorn's handlers (start-up): a clean exit
        pass


async def _serve(server: Any, guard: DrainGuard, drain: Drain) -> None:
    """Serve until the drain says stop (engine/server/drain.py: drain_action), cutting what is left at ABORT."""
    print(f"{NAME}: event loop {event_loop.loop_name()}", flush=True)
    task = asyncio.create_task(server.serve())
    loop = asyncio.get_running_loop()
    aborted_at: float | None = None
    while not task.done():
        action = drain.action()
        if action == ABORT and aborted_at is None:
            print(f"{NAME}: cut {abort_in_flight(guard)} request(s) still in flight", flush=True)
            aborted_at = loop.time()
        flushed = aborted_at is not None and loop.time() - aborted_at > ABORT_FLUSH_S
        if action == STOP or flushed:
            server.should_exit = True
            server.force_exit = drain.forced or flushed  # do not wait on connections that hang on
        await asyncio.sleep(0.05)
    await task
