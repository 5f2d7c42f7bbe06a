"""POST /v1/images/generations and /v1/images/edits: parse, validate, run, encode."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import StreamingResponse

from engine import AsyncEngine, OmniDiffusionSamplingParams, OmniRequestOutput, PromptInput
from server.errors import APIError, invalid
from server.images import report
from server.images.codec import MEDIA_TYPES, decode_upload, encode
from server.images.store import ImageStore
from server.images.stream import stream_response, warning_headers
from server.middleware.request_recorder import RequestLog, request_log
from server.schemas import ImageData, ImageEditRequest, ImageGenerationRequest, ImageRequest, ImagesResponse
from server.settings import ServerSettings

_DISCONNECT_POLL_S = 0.05


def images_router(engine: AsyncEngine, settings: ServerSettings, store: ImageStore) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/images/generations", response_model_exclude_none=True,
                 dependencies=[Depends(requires_json)])
    async def generations(
        body: ImageGenerationRequest, request: Request, response: Response, log: RequestLog = Depends(request_log)
    ) -> ImagesResponse:
        params = sampling_params(body, engine, settings, edit=False)
        prompt = PromptInput(prompt=body.prompt, negative_prompt=body.negative_prompt)
        if body.stream:
            return _stream(engine, settings, [prompt], body, params, log, "image_generation")
        outputs = await generate_all(request, engine, settings, [prompt], body, params, log)
        return await _response(request, response, body, outputs, store, log)

    @router.post(
        "/v1/images/edits", response_model_exclude_none=True,
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": ImageEditRequest.form_schema()}}}},
    )
    async def edits(request: Request, response: Response, log: RequestLog = Depends(request_log)) -> ImagesResponse:
        fields, images, mask = await _multipart(request, settings.max_upload_bytes)
        body = ImageEditRequest.model_validate(fields)
        params = sampling_params(body, engine, settings, edit=True)
        if mask is not None and len(images) > 1:
            raise invalid(f"a mask applies to one image, but {len(images)} images were sent", "mask")
        prompts = edit_prompts(engine, body, images, mask)
        if body.stream:
            return _stream(engine, settings, prompts, body, params, log, "image_edit")
        outputs = await generate_all(request, engine, settings, prompts, body, params, log)
        return await _response(request, response, body, outputs, store, log)

    return router


def _require_content_type(request: Request, expected: str) -> None:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(expected):
        raise APIError(415, f"content-type must be {expected}, got {content_type or 'none'!r}",
                       code="unsupported_media_type")


def requires_json(request: Request) -> None:
    _require_content_type(request, "application/json")


async def _multipart(request: Request, max_bytes: int):
    _require_content_type(request, "multipart/form-data")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes * 4:
        raise APIError(413, f"request body is {declared} bytes; the limit is {max_bytes * 4} bytes",
                       code="request_too_large")
    try:
        form = await request.form(max_files=16, max_fields=64)
    except Exception as exc:
        raise invalid(f"could not parse the multipart body: {exc}", code="invalid_multipart") from None
    fields: dict[str, str] = {}
    images, mask = [], None
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read(max_bytes + 1)
            if name in ("image", "image[]"):
                images.append(await run_in_threadpool(decode_upload, data, name, max_bytes))
            elif name == "mask":
                mask = await run_in_threadpool(decode_upload, data, "mask", max_bytes, True)
            else:
                raise invalid(f"unexpected file field {name!r}; send image, image[] or mask", name, "unknown_parameter")
        elif name in fields:
            raise invalid(f"{name} given more than once", name)
        else:
            fields[name] = value
    if not images:
        raise invalid("image is required: send one file as 'image' or several as 'image[]'", "image",
                      "missing_required_parameter")
    return fields, images, mask


def edit_prompts(engine: AsyncEngine, body: ImageRequest, images: list, mask=None) -> list[PromptInput]:
    """The plus family (Qwen-Image-Edit-2509/2511) reads all images as conditions of one result;
    every other family edits each image on its own (n outputs per image)."""
    groups = [images] if engine.model.family.edits_images_together else [[image] for image in images]
    return [PromptInput(prompt=body.prompt, negative_prompt=body.negative_prompt, images=group, mask=mask)
            for group in groups]


def sampling_params(api_request: ImageRequest, engine: AsyncEngine, settings: ServerSettings, edit: bool,
                    how_to_edit: str = "use POST /v1/images/edits") -> OmniDiffusionSamplingParams:
    """The engine's parameters, after checking that `model` is served (the base model or a LoRA
    adapter of it) and fits the endpoint."""
    model = api_request.model
    adapter = model if model in engine.loras.adapters else None
    folder = {str(engine.model.path)} if engine.model is not None else set()  # what /v1/model_info calls model_path
    if model is not None and adapter is None and model not in settings.model_names | folder:
        served = [*settings.served_model_names, *engine.loras.names]
        raise APIError(404, f"model {model!r} is not served here; available: {served}", "model", "model_not_found")
    if api_request.lora_scale is not None and adapter is None:
        raise invalid("lora_scale applies to the LoRA adapter named by model; use loras for others", "lora_scale")
    if engine.model is not None and engine.model.family.is_edit and not edit:
        raise invalid(f"model {settings.served_model_name!r} edits images: {how_to_edit}", "model",
                      "unsupported_endpoint")
    return api_request.sampling_params(adapter)


async def generate_all(
    request: Request, engine: AsyncEngine, settings: ServerSettings, prompts: list[PromptInput],
    api_request: ImageRequest, params: OmniDiffusionSamplingParams, log: RequestLog,
) -> list[OmniRequestOutput]:
    """Run every prompt; if the client goes away first, cancel them (they stop at the next step)."""
    log.add(model=api_request.model or settings.served_model_name, size=api_request.size, n=api_request.n)
    work = asyncio.ensure_future(asyncio.gather(*(engine.generate(prompt, params) for prompt in prompts)))
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (Ray Serve's proxy does that when the client goes)
        watcher.cancel()
        abandoned = not work.done()
        if abandoned:
            work.cancel()  # the gather is cancelled once its parts are, after this returns
    if abandoned:
        raise APIError(499, "the client closed the connection; the request was cancelled", code="client_disconnected")
    outputs = work.result()
    _log_outputs(log, outputs)
    return outputs


def _stream(engine: AsyncEngine, settings: ServerSettings, prompts: list[PromptInput], api_request: ImageRequest,
            params: OmniDiffusionSamplingParams, log: RequestLog, event_prefix: str) -> StreamingResponse:
    log.add(model=api_request.model or settings.served_model_name, size=api_request.size, n=api_request.n,
            stream=True, partial_images=api_request.partial_images or 0)
    return stream_response(engine, prompts, api_request, params, event_prefix, log.received,
                           on_done=lambda outputs: _log_outputs(log, outputs))


def _log_outputs(log: RequestLog, outputs: list[OmniRequestOutput]) -> None:
    first = outputs[0]
    log.add(steps=first.num_inference_steps, batch=first.batch_images, queue_wait=f"{first.timings['queue_s']:.3f}s",
            seed=first.seed)
    if "cached_steps" in first.timings:
        log.add(cached_steps=first.timings["cached_steps"])
    if "result_cache_hit" in first.timings:
        log.add(result_cache="hit")


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)


def answer_headers(outputs: list[OmniRequestOutput], log: RequestLog) -> dict[str, str]:
    """A whole answer's headers, once its images are encoded: the warnings of every output in one
    header, and the request's phases until now in Server-Timing."""
    return {**warning_headers([w for output in outputs for w in output.warnings]),
            **report.server_timing_header(report.timings_ms(outputs, log.received))}


async def _response(
    request: Request, response: Response, api_request: ImageRequest, outputs: list[OmniRequestOutput],
    store: ImageStore, log: RequestLog,
) -> ImagesResponse:
    """The body, and answer_headers."""
    fmt = api_request.output_format
    data = []
    for output in outputs:
        for image, seed in zip(output.images, output.seeds):
            encoded = await run_in_threadpool(encode, image, fmt, api_request.output_compression)
            if api_request.response_format == "url":
                token = store.put(encoded, MEDIA_TYPES[fmt])
                url = str(request.url_for("image_file", token=token))  # the route is in server.app
                data.append(ImageData(url=url, seed=seed))
            else:
                data.append(ImageData(b64_json=base64.b64encode(encoded).decode("ascii"), seed=seed))
    first = outputs[0].images[0]
    response.headers.update(answer_headers(outputs, log))
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=fmt,
        size=f"{first.width}x{first.height}",
        quality=api_request.quality or "auto",
        background="opaque",
        seed=outputs[0].seed,
        usage=report.usage(outputs),
        peak_memory_mb=report.peak_memory_mb(outputs),
    )
