"""FastAPI app factory of the OpenAI-compatible server.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{model}] (with max_model_len),
POST /tokenize and /detokenize (as in vLLM and SGLang), GET /health, GET /metrics.
Every error answers OpenAI's error JSON (errors.py). The app starts and stops the engine client in its
lifespan, so whoever serves the app (uvicorn, tests) gets a running engine loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from moefleet.engine.server.async_engine import EngineClient
from moefleet.engine.server.errors import OpenAIError, error_body, install_error_handlers
from moefleet.engine.server.metrics import ServerMetrics
from moefleet.engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from moefleet.engine.server.serving import ServerState, check_model, create_chat_completion, create_completion


def build_app(client: EngineClient, served_model_name: str, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The HTTP app serving `client` under the model name `served_model_name`.

    `routers` add routes of other parts (e.g. an EPLB admin endpoint); they can read the shared state as
    `request.app.state.moefleet` (`ServerState`: client, served_model_name, metrics) and raise `OpenAIError`.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client.start()
        try:
            yield
        finally:
            client.shutdown()

    app = FastAPI(title="moefleet", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    state = ServerState(
        client=client,
        served_model_name=served_model_name,
        metrics=ServerMetrics(client.stats, client.rank_stats),
    )
    app.state.moefleet = state
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = ModelCard(id=served_model_name, max_model_len=client.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> JSONResponse:
        check_model(state, model)
        return JSONResponse(ModelCard(id=served_model_name, max_model_len=client.max_model_len).model_dump())

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        if body.model is not None:
            check_model(state, body.model)
        tokenizer = client.tokenizer
        if body.messages is not None:
            messages = [m.for_template() for m in body.messages]
            try:
                tokens = list(
                    tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
                )
            except ValueError as exc:
                raise OpenAIError(str(exc), param="messages") from exc
        else:
            assert body.prompt is not None
            tokens = list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": client.max_model_len})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        if body.model is not None:
            check_model(state, body.model)
        vocab_size = client.vocab_size
        bad = [t for t in body.tokens if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise OpenAIError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param="tokens"
            )
        return JSONResponse({"prompt": client.tokenizer.decode(body.tokens)})

    @app.get("/health")
    async def health() -> JSONResponse:
        dead = client.dead_error
        if dead is not None:
            return JSONResponse(error_body(f"the engine is not running: {dead}", 503), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    for router in routers:
        app.include_router(router)

    return app
