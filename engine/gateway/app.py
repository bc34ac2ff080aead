"""The gateway's HTTP app: OpenAI-compatible routes relayed to engine groups picked by load.

Request flow: parse just enough of the body (JSON object, `stream`, the prompt prefix) -> pick a backend of the
serving role (routing.py, over the pool's snapshot) -> send upstream -> relay. A failure before the first byte
reaches the client (connection refused, a 502/503/504 answer, a stream that dies before its first chunk) marks
the backend failed and tries another one; after that the stream ends with an OpenAI error event, so a client
never hangs: a backend that stops answering mid-stream is detected by the health poll within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from moefleet.engine.gateway.metrics import GatewayMetrics
from moefleet.engine.gateway.pd import PDRelay
from moefleet.engine.gateway.pool import Backend, BackendPool, role_counts, should_cut_silent_stream
from moefleet.engine.gateway.relay_response import RelayResponse
from moefleet.engine.gateway.routing import NoBackendError, pick_backend, prefix_key_of
from moefleet.engine.gateway.upstream import (
    Busy,
    Full,
    Upstream,
    UpstreamAnswer,
    UpstreamBusy,
    UpstreamError,
)
from moefleet.engine.server.errors import (
    KV_CACHE_FULL_CODE,
    OpenAIError,
    error_body,
    error_response,
    install_error_handlers,
)
from moefleet.engine.server.request_guard import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_REQUEST_BYTES, json_depth

log = logging.getLogger("moefleet.gateway")

# Hop-by-hop and framing headers are not forwarded; everything else (authorization, request ids) is.
_DROP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}
RETRYABLE_STATUS = (502, 503, 504)
MAX_ATTEMPTS = 3
# While a stream is quiet this long, the gateway checks that its backend still passes health polls.
STALL_CHECK_SECONDS = 1.0
# Connecting to an engine: generous, since a burst of requests can delay this process's own event loop.
CONNECT_TIMEOUT_SECONDS = 10.0
# A stream whose group's health polls only time out is cut after this long (pool.should_cut_silent_stream).
SLOW_BACKEND_PATIENCE_SECONDS = 30.0


class Gateway:
    """Routing state shared by the routes: the pool, the HTTP client to the engines, metrics."""

    def __init__(
        self,
        pool: BackendPool,
        *,
        upstream_timeout: float | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ):
        self.pool = pool
        self.max_request_bytes = max_request_bytes
        self.metrics = GatewayMetrics(lambda: role_counts(self.pool.backends.values()))
        for role in pool.config.serving_roles:  # 0, not absent, until the first retry: rate() has data
            self.metrics.retries.labels(role)
        self._children: dict[tuple[Any, ...], Any] = {}  # labelled metric children, looked up once
        self.turns = itertools.count()
        self.pd = PDRelay(self)
        # The request path's client (relayed requests); `client` (httpx) serves bootstrap, models, prefill legs.
        self.upstream = Upstream(connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=upstream_timeout)
        # No read timeout by default: generations may be long; liveness comes from the health poll instead.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(upstream_timeout, connect=CONNECT_TIMEOUT_SECONDS),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    @property
    def role(self) -> str:
        return self.pool.config.serving_roles[0]

    def pick(self, exclude: frozenset[str], prefix_key: str) -> Backend:
        view = pick_backend(
            self.pool.views(),
            self.role,
            self.pool.config.routing_policy,
            exclude=exclude,
            turn=next(self.turns),
            prefix_key=prefix_key,
        )
        return self.pool.backends[view.name]

    async def relay(self, request: Request, path: str) -> Response:
        raw = await self._limited_body(request)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OpenAIError(
                f"the request body is not valid JSON ({exc}); send a JSON object with Content-Type: application/json",
                code="invalid_json",
            ) from exc
        if not isinstance(body, dict):
            raise OpenAIError(
                "the request body must be a JSON object sent with Content-Type: application/json"
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS}
        prefix_key = prefix_key_of(body) if self.pool.config.routing_policy == "prefix-cache" else ""
        if self.pool.config.mode == "disaggregated":
            answer = await self.pd.relay(path, raw, body, headers, prefix_key)
            if answer is not None:
                return answer  # else: served whole by a decode group
        tried: set[str] = set()
        last_error = ""
        for _attempt in range(MAX_ATTEMPTS):
            try:
                backend = self.pick(frozenset(tried), prefix_key)
            except NoBackendError as exc:
                message = f"{exc}" + (f" (last error: {last_error})" if last_error else "")
                return self._answer(JSONResponse(error_body(message, 503), status_code=503))
            tried.add(backend.name)
            response = await self._try(backend, path, raw, headers, bool(body.get("stream")))
            if isinstance(response, str):
                last_error = f"{backend.name}: {response}"
                if not isinstance(response, Busy):  # the health poll decides about a busy one
                    self.pool.mark_failed(backend.name, response)
                self.metrics.retries.labels(self.role).inc()
                continue
            return response
        message = f"no {self.role} group could take the request after {len(tried)} attempts ({last_error}); retry later"
        return self._answer(JSONResponse(error_body(message, 503), status_code=503))

    async def _limited_body(self, request: Request) -> bytes:
        """The body, refused early like the engine's request guard: 413 over `max_request_bytes` (from the
        Content-Length header, or counted as a chunked body arrives), 400 for JSON nested too deep."""
        limit = self.max_request_bytes
        too_large = (
            f"the request body is larger than this gateway's limit of {limit} bytes; send a smaller request "
            "(the gateway's --max-request-bytes sets the limit)"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise OpenAIError(too_large, status_code=413, code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise OpenAIError(too_large, status_code=413, code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        depth = json_depth(raw)
        if depth > DEFAULT_MAX_JSON_DEPTH:
            message = f"the request body nests JSON {depth} levels deep; this gateway accepts at most {DEFAULT_MAX_JSON_DEPTH}"
            raise OpenAIError(message, code="json_too_deep")
        return raw

    async def _try(
        self, backend: Backend, path: str, raw: bytes, headers: dict[str, str], stream: bool
    ) -> Response | str:
        """The relayed response, or why this backend failed before anything reached the client (retry)."""
        started = time.perf_counter()
        backend.in_flight += 1
        upstream: UpstreamAnswer | None = None
        handed_over = False  # to the streaming relay, which then owns in_flight and the upstream answer
        finished = False
        try:
            upstream = await self.upstream.post(backend.url + path, raw, headers)
            if upstream.status_code in RETRYABLE_STATUS:
                detail = (await upstream.read()).decode(errors="replace")
                finished = True
                return _refusal(upstream.status_code, detail)
            if not (stream and upstream.status_code == 200):
                content = await upstream.read()
                finished = True
                self._child(self.metrics.upstream_seconds, self.role).observe(time.perf_counter() - started)
                return self._answer(
                    Response(content, status_code=upstream.status_code, media_type=upstream.content_type)
                )
            first = await upstream.chunk()  # a stream that dies before its first chunk is retried too
            if not first:
                return "the stream ended before its first chunk"
            handed_over = True
        except UpstreamBusy as exc:  # a busy engine (or this gateway's own loop): not proof it is down
            return Busy(str(exc))
        except UpstreamError as exc:
            return str(exc)
        finally:
            if not handed_over:
                backend.in_flight -= 1
                if upstream is not None:
                    await upstream.close(finished)
        self._child(self.metrics.requests, self.role, "200").inc()
        return RelayResponse(
            self._stream(backend, upstream, first, started),
            status_code=200,
            media_type=upstream.content_type or "text/event-stream",
        )

    async def _stream(
        self,
        backend: Backend,
        upstream: UpstreamAnswer,
        first: bytes,
        started: float,
    ) -> AsyncIterator[bytes]:
        """Relay an upstream SSE stream; if it breaks, end with an OpenAI error event and [DONE].

        Chunks are awaited in this task (no task per chunk): a timer armed around each read checks, every
        STALL_CHECK_SECONDS the backend stays quiet, whether its health polls still pass, and cancels the read
        when they do not (StallWatch)."""
        watch = StallWatch(backend)
        finished = False
        try:
            yield first
            while True:
                watch.arm()
                try:
                    chunk = await upstream.chunk()
                except asyncio.CancelledError:
                    if not watch.cut:
                        raise  # the client left (or shutdown): not ours to handle
                    watch.uncancel()
                    raise RuntimeError(f"backend {backend.name} stopped answering health checks") from None
                finally:
                    watch.disarm()
                if not chunk:
                    finished = True
                    break
                yield chunk
        except (UpstreamError, RuntimeError) as exc:
            message = f"the engine group {backend.name} failed mid-stream ({exc}); retry the request"
            log.warning(message)
            self.pool.mark_failed(backend.name, str(exc))
            yield _sse(error_body(message, 502)) + _sse("[DONE]")
        finally:
            # Shielded: a client disconnect (RelayResponse) or the drain's cut cancels this task, and a second
            # cancel during an unshielded await here would leave the upstream request open in the engine.
            with anyio.CancelScope(shield=True):
                watch.disarm()
                backend.in_flight -= 1
                self._child(self.metrics.upstream_seconds, self.role).observe(time.perf_counter() - started)
                await upstream.close(finished)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _answer(self, response: Response) -> Response:
        self._child(self.metrics.requests, self.role, str(response.status_code)).inc()
        return response

    async def models(self) -> Response:
        for backend in self.pool.backends.values():
            if backend.role == self.role and backend.healthy and backend.listed:
                with contextlib.suppress(httpx.HTTPError):
                    upstream = await self.client.get(backend.url + "/v1/models", timeout=5.0)
                    if upstream.status_code == 200:
                        return Response(upstream.content, media_type="application/json")
        model = self.pool.config.model
        if model is None:
            return JSONResponse(error_body(f"no healthy {self.role} group to ask for its models", 503), 503)
        return JSONResponse(
            {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "moefleet"}]}
        )

    def health(self) -> Response:
        ready = self.pool.ready_roles()
        missing = [role for role, count in ready.items() if count == 0]
        if missing:
            states = {
                b.name: b.state + (f" ({b.last_error})" if b.last_error else "")
                for b in self.pool.backends.values()
            }
            message = f"no ready group for role(s) {missing}; backends: {states}"
            return JSONResponse(error_body(message, 503), status_code=503)
        return JSONResponse({"status": "ok", "ready_groups": ready, "mode": self.pool.config.mode})


class StallWatch:
    """Per stream: while a read from the backend is pending, every STALL_CHECK_SECONDS check that the backend
    still passes health polls (pool.should_cut_silent_stream); when it does not, cancel the reading task.
    One timer handle per read instead of a task and a wait per chunk: the relay's hot loop stays cheap."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.task = asyncio.current_task()
        self.loop = asyncio.get_running_loop()
        self.cut = False
        self._timer: asyncio.TimerHandle | None = None
        self._cancels = 0

    def arm(self) -> None:
        self._timer = self.loop.call_later(STALL_CHECK_SECONDS, self._check)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.task is None or self.task.done():
            return
        if should_cut_silent_stream(self.backend, time.monotonic(), SLOW_BACKEND_PATIENCE_SECONDS):
            self.cut = True
            self._cancels += 1
            self.task.cancel()
        else:
            self.arm()

    def uncancel(self) -> None:
        """Take back the cancellations this watch requested (the task goes on to send the error event)."""
        if self.task is not None:
            for _ in range(self._cancels):
                self.task.uncancel()
        self._cancels = 0


def _refusal(status: int, detail: str) -> str:
    """Why a backend answered a retryable status: `Full` for a 503 `kv_cache_full` (no room now: retried
    elsewhere, the backend stays in the pool), else the status and the start of the body."""
    why = f"answered {status}: {detail[:200]}"
    try:
        answer = json.loads(detail)
    except ValueError:
        return why
    error = answer.get("error") if isinstance(answer, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return Full(why) if status == 503 and code == KV_CACHE_FULL_CODE else why


def _sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


RELAYED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class GatewayApp(FastAPI):
    """FastAPI, with the two relayed routes answered before FastAPI's middleware and routing stack.

    Per request that stack (routing, exception and telemetry middlewares, dependency solving) cost the gateway
    about as much CPU as the relay itself (benchmarks/gateway_overhead.py, docs/benchmarks.md); the fast path
    keeps its contract: OpenAIError -> its OpenAI error JSON, anything else -> 500 in OpenAI form. Every other
    route (and lifespan) goes through FastAPI as before."""

    gateway: Gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in RELAYED_PATHS:
            try:
                response = await self.gateway.relay(Request(scope, receive), scope["path"])
            except OpenAIError as exc:
                response = error_response(exc)
            except Exception as exc:
                log.exception("internal error relaying %s", scope["path"])
                message = f"internal server error: {type(exc).__name__}: {exc}"
                response = JSONResponse(error_body(message, 500), status_code=500)
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def build_gateway_app(gateway: Gateway, reload: Any = None) -> FastAPI:
    """The gateway app; `reload` is an optional coroutine function run as a background task (config reload)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.pool.start()
        task = asyncio.create_task(reload()) if reload is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await gateway.pool.close()
            await gateway.client.aclose()
            await gateway.upstream.aclose()

    app = GatewayApp(
        title="moefleet gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.gateway = gateway
    app.gateway = gateway
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.relay(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.relay(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> Response:
        return await gateway.models()

    @app.get("/health")
    async def health() -> Response:
        return gateway.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
