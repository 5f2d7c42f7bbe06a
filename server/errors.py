"""OpenAI-shaped errors: one exception type, and the one place that turns every error into a response.

Body: {"error": {"message", "type", "param", "code"}}. Failures that a retry cannot fix carry
`x-should-retry: false` so the official SDK does not silently run an expensive request again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import (
    EngineError,
    EngineNotReady,
    GenerationError,
    InvalidRequestError,
    LoraLoadError,
    LoraNotFound,
    QueueFull,
    RequestTimedOut,
    WorkerGroupDied,
)
from server.schemas import API_PARAM

logger = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retryable: bool = False,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retryable = retryable
        self.headers = headers or {}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class _Mapping:
    status: int
    code: str
    retry_after_s: int | None = None  # set: the SDK may retry, and is told when


# Engine errors by type; the first class in an error's MRO that is listed here decides.
_ENGINE_ERRORS: dict[type[EngineError], _Mapping] = {
    LoraNotFound: _Mapping(404, "model_not_found"),
    InvalidRequestError: _Mapping(400, "invalid_value"),
    QueueFull: _Mapping(429, "queue_full", retry_after_s=1),
    EngineNotReady: _Mapping(503, "model_not_ready", retry_after_s=5),
    WorkerGroupDied: _Mapping(503, "worker_died", retry_after_s=1),
    RequestTimedOut: _Mapping(504, "timeout"),
    GenerationError: _Mapping(500, "generation_failed"),
}


def api_error_for(error: EngineError) -> APIError:
    listed = (_ENGINE_ERRORS[kind] for kind in type(error).__mro__ if kind in _ENGINE_ERRORS)
    mapping = next(listed, _Mapping(500, "internal_error"))
    param = getattr(error, "param", None)
    headers = {} if mapping.retry_after_s is None else {"retry-after": str(mapping.retry_after_s)}
    code = error.code if isinstance(error, LoraLoadError) else mapping.code
    return APIError(mapping.status, str(error), API_PARAM.get(param, param), code,
                    retryable=mapping.retry_after_s is not None, headers=headers)


def validation_api_error(errors: list[dict]) -> APIError:
    """The first pydantic error as a 400 naming its field (the body's own location parts left out)."""
    first = errors[0]
    loc = [str(part) for part in first["loc"] if part not in ("body", "query", "path")]
    if first["type"] == "json_invalid":
        return invalid(f"request body is not valid JSON: {first['msg']}", code="invalid_json")
    if not loc:  # the body itself has the wrong shape (an array, a string)
        return invalid(f"request body must be a JSON object: {first['msg']}", code="invalid_json")
    param = ".".join(loc)
    code = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter",
            "unsupported_value": "unsupported_value"}.get(first["type"], "invalid_value")
    return invalid(f"unknown parameter: {param}" if code == "unknown_parameter" else f"{param}: {first['msg']}",
                   param, code)


def error_body(error: APIError) -> dict:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.code}}


def error_response(error: APIError) -> JSONResponse:
    headers = {"x-should-retry": "true" if error.retryable else "false", **error.headers}
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, error: EngineError) -> JSONResponse:
        return error_response(api_error_for(error))

    @app.exception_handler(RequestValidationError)
    async def _request_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_api_error(error.errors()))

    @app.exception_handler(pydantic.ValidationError)
    async def _validation_error(request: Request, error: pydantic.ValidationError) -> JSONResponse:
        return error_response(validation_api_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # 400: FastAPI could not read the body (invalid UTF-8, JSON nested too deep); 405 keeps its Allow header
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, code=code, headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(error).__name__}", code="internal_error"))
