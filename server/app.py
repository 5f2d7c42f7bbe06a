"""The FastAPI application: engine lifecycle, auth, request ids, and the small info routes."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from engine import AsyncEngine, EngineState
from server.errors import APIError, install_error_handlers
from server.images.chat import chat_router
from server.images.routes import images_router
from server.images.store import DirectoryImageStore, ImageStore
from server.lora_paths import LoraPathRefused
from server.middleware.connection_limits import BodyLimit
from server.middleware.request_recorder import RequestRecorder
from server.model_info import model_fields, model_info
from server.openapi import install_openapi
from server.playground import playground_router
from server.settings import ServerSettings

logger = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return version("ditserve")
    except PackageNotFoundError:
        return "unknown"


def _report_loaded(engine: AsyncEngine, settings: ServerSettings, on_cannot_serve: Callable[[], None]) -> None:
    """After the first load and every restart: announce readiness, or ask the server to stop when the
    model cannot serve (a server that cannot serve should exit, so a supervisor sees and restarts it)."""
    if engine.state is EngineState.STOPPED:
        return
    if engine.healthy:
        weights = f", {engine.config.quantization} weights" if engine.config.quantization else ""
        logger.info("ditserve ready: serving %s at http://%s:%d (%s%s, max_batch_size=%d); try:\n%s",
                    settings.served_model_name, settings.host, settings.port,
                    engine.config.parallel_config.layout.describe(), weights, engine.config.max_batch_size,
                    example_curl(settings, engine.model.family.is_edit))
    else:
        logger.error("ditserve could not load %s; shutting down", settings.model)
        on_cannot_serve()


def example_curl(settings: ServerSettings, edits: bool) -> str:
    """A command to paste into a shell: one image from the served model, written to image.png."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = f"http://{host}:{settings.port}/v1/images"
    builtin = settings.builtin
    prompt = builtin.example_prompt if builtin and builtin.example_prompt else "a cat reading a book"
    auth = ' -H "Authorization: Bearer $DITSERVE_API_KEY"' if settings.api_key else ""
    if edits:
        request = (f"curl -s {base}/edits{auth} -F model={shlex.quote(settings.served_model_name)} "
                   f"-F image=@input.png -F prompt={shlex.quote(prompt)}")
    else:
        body = json.dumps({"model": settings.served_model_name, "prompt": prompt, "seed": 1})
        request = f"curl -s {base}/generations{auth} -H 'Content-Type: application/json' -d {shlex.quote(body)}"
    save = ("python3 -c 'import base64, json, sys; "
            "open(\"image.png\", \"wb\").write(base64.b64decode(json.load(sys.stdin)[\"data\"][0][\"b64_json\"]))'")
    return f"  {request} | {save}"


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, description="a folder, a .safetensors file or a hub id")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM sends it; names identify adapters here


def create_app(engine: AsyncEngine, settings: ServerSettings,
               cluster_metrics: Callable[[], Awaitable[bytes]] | None = None,
               on_cannot_serve: Callable[[], None] = lambda: None) -> FastAPI:
    """cluster_metrics: more Prometheus text for /metrics (every replica's, under Ray Serve).
    on_cannot_serve: stops the server when the model cannot load or restart (under Ray Serve the
    replica's failing health check does that)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start(on_loaded=lambda: _report_loaded(engine, settings, on_cannot_serve))
        yield
        await engine.shutdown()

    engine.loras.reserved_names |= settings.model_names  # an adapter may not take a name the base model answers to
    app = FastAPI(title="ditserve", version=package_version(), lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app)
    # a chat request carries its images inline, base64 (4/3 of the bytes): room for a few uploads
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, read_timeout_s=settings.read_timeout_s,
                       path_limits={"/v1/chat/completions": settings.max_request_bytes + 4 * settings.max_upload_bytes})
    app.add_middleware(RequestRecorder, metrics=engine.metrics,
                       headers={"x-ditserve-replica": settings.replica_name} if settings.replica_name else {})
    started = int(time.time())

    def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.accepting:
            return JSONResponse({"status": "ok", "model": settings.served_model_name})
        status = "stopping" if engine.healthy else engine.state.value
        return JSONResponse({"status": status, "detail": engine.failure}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        text = generate_latest(engine.metrics.registry)
        if cluster_metrics is not None:
            text += await cluster_metrics()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": package_version()}

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models() -> dict:
        """The base model, then each LoRA adapter as a model of its own (vLLM's shape: `parent`, `root`)."""
        base = {"id": settings.served_model_name, "object": "model", "created": started, "owned_by": "ditserve",
                "root": settings.model, "parent": None, "aliases": list(settings.served_model_names[1:]),
                **model_fields(settings, engine.model)}
        adapters = [{"id": adapter.name, "object": "model", "created": started, "owned_by": "ditserve",
                     "root": adapter.path, "parent": settings.served_model_name}
                    for adapter in engine.loras.adapters.values()]
        return {"object": "list", "data": [base, *adapters]}

    @app.get("/v1/model_info", dependencies=[Depends(require_api_key)])
    async def get_model_info() -> dict:
        return model_info(settings, engine.model)

    if settings.enable_lora_loading:
        @app.post("/v1/load_lora_adapter", dependencies=[Depends(require_api_key)])
        async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
            try:
                path = settings.lora_paths.checked(body.lora_path)
            except LoraPathRefused as exc:
                raise APIError(400, str(exc), "lora_path", "lora_path_not_allowed") from None
            await engine.load_lora(body.lora_name, path)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", dependencies=[Depends(require_api_key)])
        async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
            await engine.unload_lora(body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    if settings.enable_playground:
        app.include_router(playground_router())

    store = (DirectoryImageStore(Path(settings.image_store_dir), ttl_s=settings.url_ttl_s)
             if settings.image_store_dir else ImageStore(ttl_s=settings.url_ttl_s))
    app.include_router(images_router(engine, settings, store), dependencies=[Depends(require_api_key)])
    app.include_router(chat_router(engine, settings), dependencies=[Depends(require_api_key)])

    @app.get("/files/images/{token}", include_in_schema=False)
    async def image_file(token: str) -> Response:
        """Images of `response_format=url`: the unguessable token is the credential."""
        entry = store.get(token)
        if entry is None:
            raise APIError(404, "image not found or expired", "token", "image_not_found")
        data, media_type = entry
        return Response(data, media_type=media_type)

    return app
