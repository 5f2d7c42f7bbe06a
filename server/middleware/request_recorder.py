"""ASGI middleware: a request id (and any fixed headers, e.g. the Ray replica's name) on every
response, and one log line plus metrics per image request.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps `receive` and would hide a
client's disconnect from the routes that watch for it. The image routes receive this request's
RequestLog as a dependency and fill in what they learn (model, size, seed, ...).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request

from engine.metrics import Metrics

logger = logging.getLogger(__name__)

IMAGE_ROUTES = {"/v1/images/generations": "generations", "/v1/images/edits": "edits",
                "/v1/chat/completions": "chat_completions"}


@dataclass
class RequestLog:
    """The fields of one request's log line, beyond id, route, status and time."""

    request_id: str
    fields: dict[str, object] = field(default_factory=dict)
    received: float = field(default_factory=time.perf_counter)  # when the request arrived (Server-Timing)

    def add(self, **fields: object) -> None:
        self.fields.update(fields)


def request_log(request: Request) -> RequestLog:
    """FastAPI dependency: this request's RequestLog, made by RequestRecorder."""
    return request.scope["state"]["request_log"]


class RequestRecorder:
    def __init__(self, app, metrics: Metrics, headers: dict[str, str] | None = None):
        self.app, self.metrics = app, metrics
        self.headers = [(name.encode(), value.encode()) for name, value in (headers or {}).items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        log = RequestLog(str(uuid.uuid4()))
        scope.setdefault("state", {})["request_log"] = log
        started, status = log.received, 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", log.request_id.encode()),
                                      *self.headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = IMAGE_ROUTES.get(scope["path"])
            if route is not None:
                seconds = time.perf_counter() - started
                self.metrics.requests.labels(route, str(status)).inc()
                self.metrics.request_seconds.labels(route).observe(seconds)
                fields = " ".join(f"{k}={v}" for k, v in log.fields.items())
                logger.info("%s %s status=%d time=%.3fs %s", log.request_id, route, status, seconds, fields)
