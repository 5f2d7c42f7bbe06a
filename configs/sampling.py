"""The sampling knobs, declared once: what a caller may set and what a request runs with.

`OmniDiffusionSamplingParams` is the caller's view (every field optional; a model family's defaults
are one of these too). `SamplingParams` is one request's resolved, pipeline-wide values: it rides
inside the request to the pipeline call, decides which requests may share a call, and names the
pipeline arguments. Adding a knob touches three places: a field of each class here, and the HTTP
schema (server/schemas.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict

MAX_INFERENCE_STEPS = 200
MAX_OUTPUTS_PER_PROMPT = 10
MAX_SEED = 2**63 - 1
MAX_GUIDANCE_SCALE = 100.0
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound for streamed previews
MAX_LORA_SCALE = 10.0  # |scale| of one LoRA adapter


class SamplingValueError(ValueError):
    """A sampling value out of its range; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter a request runs with, by the name it was loaded under; scale multiplies its
    update (1.0: as trained; 0: off; negative: away from it). Also the HTTP API's `loras` items."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    name: str
    scale: float = 1.0


@dataclass
class OmniDiffusionSamplingParams:
    """What a caller may ask for; every field left as None takes the model family's default."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # a family's YAML defaults are validated into this

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    num_outputs_per_prompt: int | None = None
    max_sequence_length: int | None = None
    partial_images: int | None = None  # previews streamed while the image is made (0-3)
    strength: float | None = None  # image-to-image and inpainting: how far from the input (0-1)
    loras: list[LoraAdapter] | None = None  # LoRA adapters loaded on the engine, composed additively
    cache: str | None = None  # "off": no step caching for this request on a caching server ("on": as the server)
    cache_threshold: float | None = None  # first_block_cache, magcache: this request's threshold, not the server's

    def overridden_by(self, other: "OmniDiffusionSamplingParams") -> "OmniDiffusionSamplingParams":
        """These values with every field `other` sets replaced."""
        return dataclasses.replace(self, **{k: v for k, v in dataclasses.asdict(other).items() if v is not None})


# SamplingParams field -> the diffusers pipeline argument it becomes, where the names differ.
_PIPELINE_ARGUMENT = {"num_outputs_per_prompt": "num_images_per_prompt"}
_NOT_PIPELINE_ARGUMENTS = {"partial_images", "cache", "cache_threshold"}  # used by the runner around the call


@dataclass(frozen=True)
class SamplingParams:
    """One request's pipeline-wide values, every default resolved and every bound checked.

    Requests with equal SamplingParams differ only in prompt, negative prompt and seed, so they
    may share one pipeline call. None means "the pipeline's own default".
    """

    num_inference_steps: int
    num_outputs_per_prompt: int = 1
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None
    partial_images: int = 0
    strength: float | None = None
    cache: str = "off"  # resolved "on" unless asked off, and kept "on" only where the server caches
    # (engine.intake.sampling): "on" means this request's steps may be cached
    cache_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.cache not in ("on", "off"):
            raise SamplingValueError(f"cache={self.cache!r} must be 'on' or 'off'", "cache")
        if self.cache_threshold is not None and not 0 < self.cache_threshold <= 10:
            raise SamplingValueError(f"cache_threshold={self.cache_threshold} must be above 0 and at most 10",
                                     "cache_threshold")
        _check_range("num_inference_steps", self.num_inference_steps, 1, MAX_INFERENCE_STEPS)
        _check_range("partial_images", self.partial_images, 0, MAX_PARTIAL_IMAGES)
        if self.strength is not None:
            _check_range("strength", self.strength, 0, 1)
        _check_range("num_outputs_per_prompt", self.num_outputs_per_prompt, 1, MAX_OUTPUTS_PER_PROMPT)
        for name in ("guidance_scale", "true_cfg_scale"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), 0, MAX_GUIDANCE_SCALE)

    @classmethod
    def resolve(cls, asked: OmniDiffusionSamplingParams, defaults: OmniDiffusionSamplingParams) -> "SamplingParams":
        """Each field as asked, else the default; raises SamplingValueError for a value out of range."""
        values = {}
        for field in dataclasses.fields(cls):
            value = getattr(asked, field.name)
            values[field.name] = getattr(defaults, field.name) if value is None else value
        for name, unset in (("num_outputs_per_prompt", 1), ("partial_images", 0), ("cache", "on")):
            if values[name] is None:
                values[name] = unset
        if values["height"] is None:  # one side given and no default for the other: square
            values["height"] = values["width"]
        if values["width"] is None:
            values["width"] = values["height"]
        return cls(**values)

    def pipeline_arguments(self) -> dict[str, Any]:
        """The diffusers `__call__` arguments these values set (None: left to the pipeline)."""
        return {
            _PIPELINE_ARGUMENT.get(field.name, field.name): getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None and field.name not in _NOT_PIPELINE_ARGUMENTS
        }


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise SamplingValueError(f"{name}={value} must be between {low:g} and {high:g}", name)
