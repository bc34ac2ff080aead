"""OpenAI-style errors: one exception type, and the handlers that turn every failure into the JSON shape
`{"error": {"message", "type", "param", "code"}}` so clients (the `openai` package included) can read them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# HTTP status -> OpenAI error `type`.
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


# The `code` of a 503 for a valid request that an engine has no room for now (a decode server's KV cache is
# full): the gateway retries it on another group instead of taking the group out of the pool.
KV_CACHE_FULL_CODE = "kv_cache_full"

# Names pydantic inserts into an error's location for the member of a union that failed.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


class OpenAIError(Exception):
    """A request failure the server answers with OpenAI's error JSON and `status_code`."""

    def __init__(
        self, message: str, status_code: int = 400, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status_code, self.param, self.code)


def error_body(message: str, status_code: int, param: str | None = None, code: str | None = None) -> dict:
    error_type = _ERROR_TYPES.get(
        status_code, "invalid_request_error" if status_code < 500 else "server_error"
    )
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code)


def validation_error_to_openai(exc: RequestValidationError) -> OpenAIError:
    """Translate FastAPI/pydantic validation errors into one 400 naming the first bad field."""
    errors = list(exc.errors())
    if not errors:
        return OpenAIError("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return OpenAIError(
            f"the request body is not valid JSON ({detail}); send a JSON object with Content-Type: application/json",
            code="invalid_json",
        )
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # pydantic puts the union member / validator name in loc ("list[int]", "function-after[...]"); keep fields.
    fields = [
        part for part in loc if part and part not in _UNION_TAGS and not any(ch in part for ch in "[]()-")
    ]
    param = ".".join(fields) if fields else None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing" and param is None:
        message = "the request body is empty; send a JSON object with Content-Type: application/json"
    elif first.get("type") == "missing":
        message = f"'{param}' is a required field; add it to the request body"
    elif first.get("type") == "extra_forbidden":
        message = f"unknown field '{param}'; remove it (see docs/serving.md for the supported parameters)"
    elif first.get("type") == "model_attributes_type" or param is None and first.get("type") == "dict_type":
        message = "the request body must be a JSON object sent with Content-Type: application/json"
    else:
        # "Value error, max_tokens must be at least 1" -> "max_tokens must be at least 1"
        message = message.removeprefix("Value error, ")
        if param and not message.startswith(param.rsplit(".", 1)[-1]):
            message = f"invalid value for '{param}': {message}"
    return OpenAIError(message, param=param, code="invalid_value" if param else None)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error path (ours, validation, unknown route, wrong method, crash) answer OpenAI JSON."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error_to_openai(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, POST /v1/chat/completions"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        response = JSONResponse(error_body(message, exc.status_code), status_code=exc.status_code)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        message = f"internal server error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(message, 500), status_code=500)
