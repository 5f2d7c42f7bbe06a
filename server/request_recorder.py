"""ASGI middleware: a request id on every response, and one log line plus metrics per image request.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps `receive` and would hide a
client's disconnect from the routes that watch for it.
"""

from __future__ import annotations

import logging
import time
import uuid

from engine.metrics import Metrics

logger = logging.getLogger("ditserve.requests")

IMAGE_ROUTES = {"/v1/images/generations": "generations", "/v1/images/edits": "edits"}


class RequestRecorder:
    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started, status = time.perf_counter(), 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = IMAGE_ROUTES.get(scope["path"])
            if route is not None:
                seconds = time.perf_counter() - started
                self.metrics.requests.labels(route, str(status)).inc()
                self.metrics.request_seconds.labels(route).observe(seconds)
                fields = " ".join(f"{k}={v}" for k, v in state.get("log_fields", {}).items())
                logger.info("%s %s status=%d time=%.3fs %s", request_id, route, status, seconds, fields)
