"""Request and response bodies of the OpenAI Images API plus ditserve's extensions, validated once.

Bounds come from the engine's own limits (configs/sampling.py), so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from configs import (
    MAX_GUIDANCE_SCALE,
    MAX_INFERENCE_STEPS,
    MAX_LORA_SCALE,
    MAX_OUTPUTS_PER_PROMPT,
    MAX_PARTIAL_IMAGES,
    MAX_SEED,
)
from engine import LoraAdapter, OmniDiffusionSamplingParams

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")

# OmniDiffusionSamplingParams field -> the API field that sets it, where the names differ.
_API_FIELD = {"num_outputs_per_prompt": "n"}
# The API field to name in an error the engine raises about one of its fields.
API_PARAM = {"height": "size", "width": "size", **_API_FIELD}


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_value", "{message}", {"message": message})


def _invalid(message: str) -> PydanticCustomError:
    """pydantic formats an error's template with its context: the message goes in whole."""
    return PydanticCustomError("invalid_value", "{message}", {"message": message})


class ImageRequest(BaseModel):
    """Fields shared by generations and edits. Unknown fields are rejected, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_OUTPUTS_PER_PROMPT)
    size: str | None = Field("auto", description="WIDTHxHEIGHT such as '1024x1024', or 'auto' (the model's default)")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int = Field(100, ge=0, le=100)
    user: str | None = None
    # Accepted for compatibility; the diffusion models have no such knob, so they change nothing.
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES,
                                       description="with stream=true: previews per image while it is made")
    # ditserve extensions (the SDK sends them through extra_body)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(None, max_length=32000)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE_SCALE)
    true_cfg_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE_SCALE)
    strength: float | None = Field(None, ge=0, le=1, description="edits: how far from the input image (0-1; "
                                   "default: the pipeline's, 0.6, or 1.0 for Z-Image inpainting)")
    lora_scale: float | None = Field(None, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE,
                                     description="scale of the LoRA adapter named by `model` (default 1.0)")
    loras: list[LoraAdapter] | None = Field(None, description="LoRA adapters ({name, scale}) to add, composed "
                                            "additively (after the one `model` names)")
    cache: Literal["on", "off"] | None = Field(None, description="off: no step caching for this request on a "
                                               "server started with --cache-backend (the exact picture)")
    cache_threshold: float | None = Field(None, gt=0, le=10, description="first_block_cache, magcache: this "
                                          "request's threshold instead of the server's")

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_a_form_field(cls, loras: Any) -> Any:
        """A multipart form sends `loras` as JSON text."""
        if isinstance(loras, str):
            try:
                return json.loads(loras)
            except json.JSONDecodeError:
                raise _invalid("loras must be a JSON list of {name, scale} objects") from None
        return loras

    @field_validator("size")
    @classmethod
    def _size_is_auto_or_width_x_height(cls, size: str | None) -> str | None:
        if size not in (None, "auto") and not _SIZE.match(size):
            raise _invalid(f"size={size!r} is not 'auto' or WIDTHxHEIGHT such as '1024x1024'")
        return size

    @field_validator("stream")
    @classmethod
    def _streams_base64(cls, stream: bool, info: ValidationInfo) -> bool:
        if stream and info.data.get("response_format") == "url":
            raise _unsupported("stream=true sends images inside the events: use response_format='b64_json'")
        return stream

    @field_validator("background")
    @classmethod
    def _opaque_only(cls, background: str | None) -> str | None:
        if background == "transparent":
            raise _unsupported(
                "background='transparent' is not supported: these models produce opaque images; use 'opaque' or 'auto'")
        return background

    def sampling_params(self, model_adapter: str | None = None) -> OmniDiffusionSamplingParams:
        """The engine's view of this request: every sampling field of the same name, and the size.
        `model_adapter`: the LoRA adapter `model` names, if it names one (it goes first, at lora_scale)."""
        values: dict[str, Any] = {}
        match = _SIZE.match(self.size or "")
        if match:
            values["width"], values["height"] = int(match.group(1)), int(match.group(2))
        for field in dataclasses.fields(OmniDiffusionSamplingParams):
            api_name = _API_FIELD.get(field.name, field.name)
            if api_name in type(self).model_fields:
                values[field.name] = getattr(self, api_name)
        if not self.stream:
            values["partial_images"] = None  # previews only travel in a stream
        loras = list(self.loras or ())
        if model_adapter is not None:
            loras.insert(0, LoraAdapter(model_adapter, 1.0 if self.lora_scale is None else self.lora_scale))
        values["loras"] = loras or None
        return OmniDiffusionSamplingParams(**values)


class ImageGenerationRequest(ImageRequest):
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = None


class ImageEditRequest(ImageRequest):
    """The text fields of the multipart edit form; the files (image, image[], mask) come beside them."""

    input_fidelity: Literal["high", "low"] | None = None

    @classmethod
    def form_schema(cls) -> dict[str, Any]:
        """OpenAPI schema of the whole multipart body: these fields plus the image files. Nested
        models point into the document's components (server/openapi.py puts them there)."""
        schema = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.pop("$defs", None)
        binary = {"type": "string", "format": "binary"}
        schema["properties"] = {
            "image": {"anyOf": [binary, {"type": "array", "items": binary}],
                      "description": "the image(s) to edit; several may also be sent as image[]"},
            "mask": {**binary, "description": "inpainting: a PNG whose fully transparent pixels mark the region to "
                                               "change (OpenAI), or black and white (white = change)"},
            **schema["properties"],
        }
        schema["required"] = ["image", *schema.get("required", [])]
        return schema


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    """Every error the server sends: OpenAI's envelope."""

    error: ErrorDetail


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int = Field(description="the seed this image was drawn from: send it back to reproduce the image")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class ImageUsage(BaseModel):
    """OpenAI's images usage; image tokens are DiT tokens (latent patches, 16 x 16 pixels)."""

    input_tokens: int = Field(description="text_tokens + image_tokens")
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(description="DiT tokens of the images made")
    total_tokens: int
    peak_memory_mb: float = Field(description="peak memory of the ranks that made the images (CUDA: allocated "
                                              "during the request; CPU: the rank's resident peak)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    size: str
    quality: str
    background: Literal["opaque"]
    seed: int = Field(description="the request's seed; image i was drawn from seed + i")
    usage: ImageUsage
    peak_memory_mb: float = Field(description="as usage.peak_memory_mb (where SGLang's benchmark reads it)")
