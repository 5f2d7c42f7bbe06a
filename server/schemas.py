"""Request bodies of the OpenAI Images API plus ditserve's sampling extensions, validated once."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.errors import APIError, invalid

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageRequest(BaseModel):
    """Fields shared by generations and edits. Unknown fields are rejected, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int = Field(100, ge=0, le=100)
    user: str | None = None
    # Accepted for compatibility; the diffusion models have no such knob, so they change nothing.
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3)
    # ditserve extensions (the SDK sends them through extra_body)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    negative_prompt: str | None = Field(None, max_length=32000)
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    true_cfg_scale: float | None = Field(None, ge=0, le=100)

    def requested_size(self) -> tuple[int | None, int | None]:
        """(height, width) asked for; (None, None) for "auto" (the model's default)."""
        if self.size in (None, "auto"):
            return None, None
        match = _SIZE.match(self.size)
        if not match:
            raise invalid(f"size={self.size!r} is not 'auto' or WIDTHxHEIGHT such as '1024x1024'", "size")
        width, height = int(match.group(1)), int(match.group(2))
        return height, width

    def check_supported(self) -> None:
        if self.stream:
            raise invalid("stream=true is not supported yet; send stream=false", "stream", "unsupported_value")
        if self.background == "transparent":
            raise invalid(
                "background='transparent' is not supported: these models produce opaque images; use 'opaque' or 'auto'",
                "background", "unsupported_value",
            )


class ImageGenerationRequest(ImageRequest):
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = None


class ImageEditRequest(ImageRequest):
    input_fidelity: Literal["high", "low"] | None = None


def validation_error(error) -> APIError:
    """The first pydantic error as a 400 naming its field."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    code = "unknown_parameter" if first["type"] == "extra_forbidden" else (
        "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    )
    message = f"unknown parameter: {param}" if code == "unknown_parameter" else f"{param}: {first['msg']}"
    return invalid(message, param, code)
