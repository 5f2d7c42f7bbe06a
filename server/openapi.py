"""/openapi.json as the server behaves: the errors each route really sends (OpenAI's envelope, never
FastAPI's 422), and every schema a multipart form refers to."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from server.schemas import ErrorResponse, ImageEditRequest

_ERRORS = {
    "400": "invalid parameter or body",
    "401": "missing or invalid API key (with --api-key)",
    "404": "model or adapter not served",
    "408": "request body not received within --read-timeout",
    "413": "body or upload too large",
    "415": "wrong content-type",
    "429": "queue full (Retry-After)",
    "500": "generation failed",
    "503": "model loading, restarting or shutting down (Retry-After)",
    "504": "request timeout (with --request-timeout)",
}
_BODY_ROUTES = {"/v1/images/generations", "/v1/images/edits", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
_OTHER_ROUTES = {"/v1/models": ("401",)}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    app.openapi = openapi


def _document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, definitions = models_json_schema([(ErrorResponse, "validation"), (ImageEditRequest, "validation")],
                                        ref_template="#/components/schemas/{model}")
    schemas.update(definitions.get("$defs", {}))
    envelope = {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
    error = {"description": "", "content": {"application/json": envelope}}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = _ERRORS if path in _BODY_ROUTES else _OTHER_ROUTES.get(path, ())
            for status in statuses:
                responses.setdefault(status, {**error, "description": _ERRORS[status]})
    return document
