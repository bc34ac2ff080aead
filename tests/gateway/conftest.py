"""Gateway test fixtures: the real gateway app under uvicorn over real backend HTTP servers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from moefleet.engine.gateway.app import Gateway, build_gateway_app
from moefleet.engine.gateway.command import watch_config
from moefleet.engine.gateway.pool import BackendPool
from support.asgi import serve_asgi

from moefleet.gateway_schema import GatewayConfig, mixed_config

POLL_INTERVAL = 0.2


@contextmanager
def serve_gateway(
    config: GatewayConfig | list[str], watch: str | None = None
) -> Iterator[tuple[str, Gateway]]:
    """The gateway over `config` (or mixed backend URLs); with `watch`, it re-reads that config file."""
    if isinstance(config, list):
        config = mixed_config(config)
    gateway = Gateway(BackendPool(config, poll_interval=POLL_INTERVAL))
    reload = (lambda: watch_config(watch, gateway.pool.configure)) if watch else None
    with serve_asgi(build_gateway_app(gateway, reload)) as url:
        yield url, gateway


def scripted_backend(script: str) -> tuple[FastAPI, dict[str, Any]]:
    """A misbehaving engine stand-in: healthy on /health until `state["healthy"]` is False, and
    - "draining": answers every completion 503 (what a draining engine does);
    - "break": streams one SSE chunk, then the connection dies mid-body;
    - "hang": streams one SSE chunk, then goes silent forever."""
    app = FastAPI()
    state: dict[str, Any] = {"healthy": True, "requests": 0}

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"ok": state["healthy"]}, status_code=200 if state["healthy"] else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        state["requests"] += 1
        if script == "draining":
            body = {"error": {"message": "the server is draining", "type": "service_unavailable_error"}}
            return JSONResponse(body, status_code=503)

        async def chunks() -> Any:
            yield b'data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}\n\n'
            if script == "break":
                raise ConnectionResetError("backend died")
            await asyncio.sleep(3600)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app, state
