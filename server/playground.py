"""The playground: one self-contained page at / and /playground that drives the public API.

The page is static (server/playground.html, no build step, no external assets); it asks for an
API key only when /v1/models answers 401 and sends it in the Authorization header, never in a URL.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("playground.html")


def playground_router() -> APIRouter:
    router = APIRouter()
    page = PAGE.read_text()

    @router.get("/", include_in_schema=False)
    @router.get("/playground", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    return router
