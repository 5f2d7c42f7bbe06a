"""Bounds on what one client connection may cost the server: the size of a request body, and the
time its headers and its body may take to arrive (a client that trickles them would hold a
connection forever).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import APIError, error_response


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 in OpenAI's shape, read no further; one not
    received within `read_timeout_s` gets 408.

    Multipart bodies (edits) are streamed to their parser, which bounds each file itself
    (--max-upload-bytes); every other body is read here, whole, up to the limit (or the path's own
    in `path_limits`: JSON that carries images), and replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float, path_limits: dict[str, int] | None = None):
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _header(scope, b"content-type").startswith("multipart/form-data"):
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope["path"], self.max_bytes)
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, receive, send, int(declared), limit)
        try:
            message = await asyncio.wait_for(self._read(receive, limit), self.read_timeout_s)
        except asyncio.TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.read_timeout_s:g} s "
                                  "(--read-timeout)", code="request_timeout")
            return await error_response(error)(scope, receive, send)
        except _TooLarge as exc:
            return await self._refuse(scope, receive, send, exc.size, limit, "at least ")
        await self.app(scope, _replay([message], receive), send)

    async def _read(self, receive: Receive, limit: int) -> Message:
        """The whole body as one message, or the disconnect that ended it; _TooLarge past the limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return message
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise _TooLarge(size)
            more = message.get("more_body", False)
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int, limit: int,
                      qualifier: str = "") -> None:
        option = "--max-request-bytes" if limit == self.max_bytes else "--max-upload-bytes, for inline images"
        error = APIError(413, f"request body is {qualifier}{size} bytes; the limit is {limit} bytes ({option})",
                         code="request_too_large")
        await error_response(error)(scope, receive, send)


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


def _header(scope: Scope, name: bytes) -> str:
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), "")


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()
    return replayed


def http_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's `http=` protocol class for `serve --read-timeout`."""
    return type("H11WithHeaderTimeout", (H11WithHeaderTimeout,), {"header_timeout_s": header_timeout_s})


class H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection whose request headers are not complete within
    `header_timeout_s` of its opening (or of its previous response) is closed. uvicorn's own
    keep-alive timeout restarts on every byte received, so a client sending one byte at a time
    would otherwise never be cut off."""

    header_timeout_s = 10.0
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # headers complete: a request runs
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before the next request's headers (a pipelined one disarms it at once)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()
