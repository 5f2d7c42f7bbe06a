"""Turns a prompt plus OmniDiffusionSamplingParams into a fully resolved GenerationRequest."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from PIL import Image
from workers import GenerationRequest, OmniDiffusionSamplingParams

from engine.model_resolver import ResolvedModel

class InvalidRequestError(ValueError):
    """A request value that cannot work; `param` names it for API error bodies."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


MAX_OUTPUTS_PER_PROMPT = 10
MAX_INFERENCE_STEPS = 200
MAX_SEED = 2**63 - 1


@dataclass
class PromptInput:
    """A prompt as `Omni.generate` accepts it, after normalisation."""

    prompt: str
    negative_prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)

    @classmethod
    def from_user(cls, item: "str | dict") -> "PromptInput":
        if isinstance(item, str):
            return cls(prompt=item)
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"a prompt must be a string or a dict with a string 'prompt', got {item!r:.80}")
        image = (item.get("multi_modal_data") or {}).get("image")
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        for candidate in images:
            if not isinstance(candidate, Image.Image):
                raise ValueError(f"multi_modal_data['image'] must be PIL images, got {type(candidate).__name__}")
        return cls(prompt=item["prompt"], negative_prompt=item.get("negative_prompt"), images=images)


def new_seed() -> int:
    return secrets.randbelow(2**31)


def build_request(model: ResolvedModel, prompt: PromptInput, params: OmniDiffusionSamplingParams) -> GenerationRequest:
    """Fill unset values from the model's defaults and check every value; ValueError says what is wrong."""
    defaults = model.defaults
    family = model.family
    if not prompt.prompt.strip():
        raise InvalidRequestError("prompt must not be empty", "prompt")
    if family.is_edit and not prompt.images:
        raise InvalidRequestError(
            f"model {model.name!r} edits images: pass an input image (multi_modal_data={{'image': ...}})", "image"
        )
    if not family.is_edit and prompt.images:
        raise InvalidRequestError(
            f"model {model.name!r} generates from text only and does not take input images", "image"
        )

    steps = _first_set(params.num_inference_steps, defaults.num_inference_steps)
    if not 1 <= steps <= MAX_INFERENCE_STEPS:
        raise InvalidRequestError(
            f"num_inference_steps={steps} must be between 1 and {MAX_INFERENCE_STEPS}", "num_inference_steps"
        )
    if not 1 <= params.num_outputs_per_prompt <= MAX_OUTPUTS_PER_PROMPT:
        raise InvalidRequestError(
            f"num_outputs_per_prompt={params.num_outputs_per_prompt} must be between 1 and {MAX_OUTPUTS_PER_PROMPT}",
            "num_outputs_per_prompt",
        )
    seed = new_seed() if params.seed is None else params.seed
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError(f"seed={seed} must be between 0 and {MAX_SEED}", "seed")

    height = _first_set(params.height, defaults.height)
    width = _first_set(params.width, defaults.width)
    if (height is None) != (width is None):  # one side given, no default: square
        height = width = _first_set(height, width)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            try:
                family.size.check_side(name, value)
            except ValueError as exc:
                raise InvalidRequestError(str(exc), name) from None

    return GenerationRequest(
        request_id=str(uuid.uuid4()),
        prompt=prompt.prompt,
        seed=seed,
        num_inference_steps=steps,
        num_outputs=params.num_outputs_per_prompt,
        negative_prompt=_first_set(prompt.negative_prompt, params.negative_prompt, defaults.negative_prompt),
        guidance_scale=_first_set(params.guidance_scale, defaults.guidance_scale),
        true_cfg_scale=_first_set(params.true_cfg_scale, defaults.true_cfg_scale),
        height=height,
        width=width,
        max_sequence_length=_first_set(params.max_sequence_length, defaults.max_sequence_length),
        images=prompt.images,
    )


def _first_set(*values):
    return next((v for v in values if v is not None), None)
