"""POST /v1/chat/completions for images, in vLLM-Omni's shape: the prompt is the user's text, an
image in the message makes it an edit, and the images come back inline as `image_url` parts.

Generation fields (height, width, size, num_outputs_per_prompt, seed, negative_prompt,
num_inference_steps, guidance_scale, true_cfg_scale and every field of the images API) go at the top
level (the OpenAI SDK's `extra_body=` puts them there) or inside a literal `"extra_body"` object
(vLLM-Omni's documented curl). They are checked exactly as on the images routes. Sampling fields of
text models (temperature, top_p, max_tokens, ...) are accepted and mean nothing here; anything that
needs a text model (tools, text-only output, JSON output, streamed tokens) is a 400 saying so.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from engine import AsyncEngine, OmniRequestOutput, PromptInput
from server.errors import invalid
from server.images import report
from server.images.codec import MEDIA_TYPES, decode_upload, encode
from server.images.routes import answer_headers, edit_prompts, generate_all, requires_json, sampling_params
from server.middleware.request_recorder import RequestLog, request_log
from server.schemas import ImageEditRequest, ImageGenerationRequest, ImageRequest
from server.settings import ServerSettings

# Chat fields of text models: accepted so that chat clients work unchanged; they change nothing.
_TEXT_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens",
                  "frequency_penalty", "presence_penalty", "repetition_penalty", "stop", "logit_bias", "logprobs",
                  "top_logprobs", "stream_options", "parallel_tool_calls", "metadata", "store", "service_tier",
                  "reasoning_effort", "chat_template_kwargs"}
# Chat features that need a text model behind the route.
_TEXT_ONLY = {"tools", "tool_choice", "functions", "function_call", "audio", "prediction", "web_search_options"}
# vLLM-Omni's generation field -> the images API field.
_RENAMED = {"num_outputs_per_prompt": "n"}


class ChatImageRequest(BaseModel):
    """The chat envelope; every other top-level field is a generation field (see the module)."""

    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]] = Field(min_length=1, description="the user messages' text is the prompt; "
                                           "their image_url parts (data: URLs) are the images to edit")
    model: str | None = None
    stream: bool = False
    modalities: list[str] | None = Field(None, description="if given, must include 'image'")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'} (the default)")
    extra_body: dict[str, Any] | None = Field(None, description="generation fields, as vLLM-Omni's docs send them")


def chat_router(engine: AsyncEngine, settings: ServerSettings) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", dependencies=[Depends(requires_json)])
    async def chat_completions(body: ChatImageRequest, request: Request, response: Response,
                               log: RequestLog = Depends(request_log)) -> dict:
        _refuse_text_features(body)
        prompt, encoded_images = _prompt_and_images(body.messages)
        fields = {"prompt": prompt, "model": body.model, **_generation_fields(body)}
        images = [await run_in_threadpool(decode_upload, data, "messages", settings.max_upload_bytes)
                  for data in encoded_images]
        api_request: ImageRequest = (ImageEditRequest if images else ImageGenerationRequest).model_validate(fields)
        params = sampling_params(api_request, engine, settings, edit=bool(images),
                                 how_to_edit="add the image to the user message as an image_url part")
        prompts = (edit_prompts(engine, api_request, images) if images else
                   [PromptInput(prompt=api_request.prompt, negative_prompt=api_request.negative_prompt)])
        outputs = await generate_all(request, engine, settings, prompts, api_request, params, log)
        content = await _image_parts(outputs, api_request)
        response.headers.update(answer_headers(outputs, log))
        adapter = api_request.model if api_request.model in engine.loras.adapters else None
        return _completion(adapter or settings.served_model_name, content, outputs)

    return router


def _refuse_text_features(body: ChatImageRequest) -> None:
    extra = body.model_extra or {}
    for name in _TEXT_ONLY:
        if extra.get(name):
            raise invalid(f"{name} needs a text model; this server only generates images", name, "unsupported_value")
    if body.stream:
        raise invalid("stream=true is not offered here: the answer is whole images. For previews while an image is "
                      "made, use POST /v1/images/generations with stream=true", "stream", "unsupported_value")
    if body.modalities is not None and "image" not in body.modalities:
        raise invalid(f"modalities={body.modalities} asks for output this server cannot make: it answers with "
                      "images only (modalities=['image'])", "modalities", "unsupported_value")
    if body.response_format not in (None, {"type": "text"}):
        raise invalid("response_format: the answer is image parts; JSON output needs a text model",
                      "response_format", "unsupported_value")


def _generation_fields(body: ChatImageRequest) -> dict[str, Any]:
    """The generation fields at the top level and in "extra_body", merged (a field in both must agree),
    in the images API's names."""
    top = {name: value for name, value in (body.model_extra or {}).items() if name not in _TEXT_SAMPLING}
    fields = dict(top)
    for name, value in (body.extra_body or {}).items():
        if name in top and top[name] != value:
            raise invalid(f"{name} is given twice with different values (at the top level and in extra_body)", name)
        fields[name] = value
    if "stream" in fields:
        raise invalid("stream belongs at the top level of a chat request", "stream", "unknown_parameter")
    for old, new in _RENAMED.items():
        if old in fields:
            if new in fields and fields[new] != fields[old]:
                raise invalid(f"{old} and {new} disagree; send one of them", old)
            fields[new] = fields.pop(old)
    if "height" in fields or "width" in fields:
        size = _size(fields.pop("width", None), fields.pop("height", None))
        if fields.get("size") not in (None, "auto", size):
            raise invalid(f"size={fields['size']!r} disagrees with width and height ({size})", "size")
        fields["size"] = size
    return fields


def _size(width: Any, height: Any) -> str:
    for name, value in (("width", width), ("height", height)):
        if type(value) is not int:
            raise invalid(f"{name} must be an integer number of pixels (give both width and height, or size)", name)
    return f"{width}x{height}"


def _prompt_and_images(messages: list[dict[str, Any]]) -> tuple[str, list[bytes]]:
    """The text of the user messages (joined by spaces, as vLLM-Omni does) and the bytes of their
    images; system and assistant messages say nothing to an image model."""
    texts, images = [], []
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else None
        if parts is None:
            raise invalid("a user message's content must be a string or a list of parts", "messages")
        for part in parts:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                images.append(_data_url_bytes(url.get("url") if isinstance(url, dict) else url))
            elif isinstance(part, dict) and isinstance(part.get("image"), str):  # vLLM-Omni's short form
                images.append(_base64_bytes(part["image"]))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"message part {kind!r} is not understood: send text and image_url parts", "messages")
    prompt = " ".join(text.strip() for text in texts if text.strip())
    if not prompt:
        raise invalid("no prompt: the user messages have no text", "messages", "missing_required_parameter")
    return prompt, images


def _data_url_bytes(url: Any) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise invalid("an image_url must be a data: URL (data:image/png;base64,...); this server does not fetch "
                      "images from the network", "messages", "invalid_image_url")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise invalid("an image data: URL must be base64-encoded (data:image/png;base64,...)", "messages",
                      "invalid_image_url")
    return _base64_bytes(payload)


def _base64_bytes(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("an image in the messages is not valid base64", "messages", "invalid_image") from None


async def _image_parts(outputs: list[OmniRequestOutput], api_request: ImageRequest) -> list[dict]:
    fmt = api_request.output_format
    parts = []
    for output in outputs:
        for image in output.images:
            data = await run_in_threadpool(encode, image, fmt, api_request.output_compression)
            url = f"data:{MEDIA_TYPES[fmt]};base64,{base64.b64encode(data).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _completion(model: str, content: list[dict], outputs: list[OmniRequestOutput]) -> dict:
    """OpenAI's chat.completion object; usage counts DiT tokens as on the images routes, plus the
    peak memory vLLM-Omni's benchmark client reads at the top level."""
    usage = report.usage(outputs)
    peak = report.peak_memory_mb(outputs)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                  "total_tokens": usage.total_tokens, "peak_memory_mb": peak},
        "seed": outputs[0].seed,
        "peak_memory_mb": peak,
    }
