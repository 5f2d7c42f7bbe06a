"""Turns a prompt plus OmniDiffusionSamplingParams into a fully resolved GenerationRequest."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from PIL import Image

from configs import MAX_SEED, OmniDiffusionSamplingParams, SamplingParams, SamplingValueError
from engine.errors import InvalidRequestError
from engine.model_resolver import ResolvedModel
from workers import GenerationRequest


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
            raise InvalidRequestError(
                f"a prompt must be a string or a dict with a string 'prompt', got {item!r:.80}", "prompt")
        image = (item.get("multi_modal_data") or {}).get("image")
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        for candidate in images:
            if not isinstance(candidate, Image.Image):
                raise InvalidRequestError(
                    f"multi_modal_data['image'] must be PIL images, got {type(candidate).__name__}", "image")
        return cls(prompt=item["prompt"], negative_prompt=item.get("negative_prompt"), images=images)


def new_seed() -> int:
    return secrets.randbelow(2**31)


def build_request(model: ResolvedModel, prompt: PromptInput, params: OmniDiffusionSamplingParams) -> GenerationRequest:
    """Fill unset values from the model's defaults and check every value; InvalidRequestError says what is wrong."""
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
    seed = new_seed() if params.seed is None else params.seed
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError(f"seed={seed} must be between 0 and {MAX_SEED}", "seed")
    try:
        sampling = SamplingParams.resolve(params, model.defaults)
        for name in ("height", "width"):
            if getattr(sampling, name) is not None:
                family.size.check_side(name, getattr(sampling, name))
    except SamplingValueError as exc:
        raise InvalidRequestError(str(exc), exc.param) from None
    if sampling.num_inference_steps < family.min_inference_steps:
        raise InvalidRequestError(
            f"num_inference_steps={sampling.num_inference_steps} is too few for {family.name} models: its scheduler "
            f"needs at least {family.min_inference_steps}", "num_inference_steps")

    negatives = (prompt.negative_prompt, params.negative_prompt, model.defaults.negative_prompt)
    return GenerationRequest(
        request_id=str(uuid.uuid4()),
        prompt=prompt.prompt,
        seed=seed,
        sampling=sampling,
        negative_prompt=next((n for n in negatives if n is not None), None),
        images=prompt.images,
    )
