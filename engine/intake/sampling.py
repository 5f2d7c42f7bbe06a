"""Turns a prompt plus OmniDiffusionSamplingParams into a fully resolved GenerationRequest."""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from dataclasses import dataclass, field

from PIL import Image

from configs import MAX_SEED, CacheSettings, OmniDiffusionSamplingParams, SamplingParams, SamplingValueError
from configs.caching import BLOCK_SKIPPING_BACKENDS
from engine.errors import InvalidRequestError
from engine.intake.masks import inpainting_mask
from engine.intake.prompt_text import max_text_tokens, prompt_tokens
from engine.intake.token_counts import input_image_tokens
from engine.loras import LoraRegistry
from engine.models.resolver import ResolvedModel
from workers import GenerationRequest

_SIZE_RATIO_WARNED = 4  # pixel counts more than this far from the model's default size get a warning


@dataclass
class PromptInput:
    """A prompt as `Omni.generate` accepts it, after normalisation."""

    prompt: str
    negative_prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None  # inpainting: as sent (alpha or black-and-white), see engine.intake.masks

    @classmethod
    def from_user(cls, item: "str | dict") -> "PromptInput":
        if isinstance(item, str):
            return cls(prompt=item)
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise InvalidRequestError(
                f"a prompt must be a string or a dict with a string 'prompt', got {item!r:.80}", "prompt")
        image = (item.get("multi_modal_data") or {}).get("image")
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        mask = (item.get("multi_modal_data") or {}).get("mask")
        for name, candidate in [*(("image", i) for i in images), *([("mask", mask)] if mask is not None else [])]:
            if not isinstance(candidate, Image.Image):
                raise InvalidRequestError(
                    f"multi_modal_data[{name!r}] must be PIL images, got {type(candidate).__name__}", name)
        return cls(prompt=item["prompt"], negative_prompt=item.get("negative_prompt"), images=images, mask=mask)


def new_seed() -> int:
    return secrets.randbelow(2**31)


def build_request(model: ResolvedModel, prompt: PromptInput, params: OmniDiffusionSamplingParams,
                  adapters: LoraRegistry | None = None, max_megapixel_steps: float | None = None,
                  cache: CacheSettings = CacheSettings()) -> GenerationRequest:
    """Fill unset values from the model's defaults and check every value; InvalidRequestError says what
    is wrong. `adapters`: the LoRA adapters `params.loras` may name; `max_megapixel_steps`: the most
    work (width x height / 1e6 x steps x n) one request may ask for; `cache`: the server's step caching."""
    family = model.family
    if params.loras and adapters is None:
        raise InvalidRequestError("no LoRA adapters are loaded", "loras")
    loras = adapters.resolve(params.loras) if adapters is not None else ()
    if not prompt.prompt.strip():
        raise InvalidRequestError("prompt must not be empty", "prompt")
    if family.is_edit and not prompt.images:
        raise InvalidRequestError(
            f"model {model.name!r} edits images: pass an input image (multi_modal_data={{'image': ...}})", "image"
        )
    pipeline, mask = _edit_pipeline(model, prompt)
    if prompt.images and params.height is None and params.width is None:  # an edit keeps its input's size
        width, height = prompt.images[0].size
        params = dataclasses.replace(params, width=family.size.nearest(width), height=family.size.nearest(height))
    text_limit = max_text_tokens(family, model.path)
    if params.max_sequence_length is None and (model.defaults.max_sequence_length or 0) > text_limit:
        params = dataclasses.replace(params, max_sequence_length=text_limit)
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
    if sampling.max_sequence_length is not None and not 1 <= sampling.max_sequence_length <= text_limit:
        raise InvalidRequestError(f"max_sequence_length={sampling.max_sequence_length} must be between 1 and "
                                  f"{text_limit} for {model.name!r}", "max_sequence_length")
    if max_megapixel_steps is not None and sampling.width is not None:
        work = sampling.width * sampling.height / 1e6 * sampling.num_inference_steps * sampling.num_outputs_per_prompt
        if work > max_megapixel_steps:
            raise InvalidRequestError(
                f"this request asks for {work:g} megapixel-steps ({sampling.width}x{sampling.height}, "
                f"{sampling.num_inference_steps} steps, n={sampling.num_outputs_per_prompt}); this server runs at "
                f"most {max_megapixel_steps:g} per request: ask for fewer steps, images or pixels", "size")
    sampling = _with_cache(sampling, cache)
    if pipeline != "main":
        _check_strength(sampling)
        images, mask = _resized_to(sampling, prompt.images, mask)
        prompt = dataclasses.replace(prompt, images=images)
    tokens = prompt_tokens(family, model.path, prompt.prompt)  # None where no tokenizer is on disk
    warnings = _warnings(model, sampling, tokens)
    tokens_read = min(tokens or 0, sampling.max_sequence_length or tokens or 0)  # the pipeline truncates

    negatives = (prompt.negative_prompt, params.negative_prompt, model.defaults.negative_prompt)
    return GenerationRequest(
        request_id=str(uuid.uuid4()),
        prompt=prompt.prompt,
        seed=seed,
        sampling=sampling,
        negative_prompt=next((n for n in negatives if n is not None), None),
        images=prompt.images,
        mask=mask,
        pipeline=pipeline,
        loras=loras,
        warnings=warnings,
        text_tokens=tokens_read,
        image_tokens=input_image_tokens(family, prompt.images),
    )


def _with_cache(sampling: SamplingParams, cache: CacheSettings) -> SamplingParams:
    """`cache` stays "on" only where the server caches, so equal requests batch on any server."""
    if sampling.cache_threshold is not None and cache.backend not in BLOCK_SKIPPING_BACKENDS:
        raise InvalidRequestError(f"cache_threshold applies to {' and '.join(BLOCK_SKIPPING_BACKENDS)}; this server's "
                                  f"step cache is {cache.backend}", "cache_threshold")
    if not cache.active:
        return dataclasses.replace(sampling, cache="off", cache_threshold=None)
    return sampling


def _check_strength(sampling: SamplingParams) -> None:
    """The image-to-image and inpaint pipelines run the last steps x strength steps (diffusers'
    `get_timesteps`); none at all is their ValueError after the model ran the text encoder."""
    if sampling.strength is None:
        return
    steps = sampling.num_inference_steps
    skipped = int(max(steps - min(steps * sampling.strength, steps), 0))
    if steps - skipped < 1:
        raise InvalidRequestError(
            f"strength={sampling.strength:g} with num_inference_steps={steps} leaves no denoising step: use a "
            f"strength of at least {1 / steps:.3g} (or more steps)", "strength")


def _resized_to(sampling: SamplingParams, images: list[Image.Image],
                mask: Image.Image | None) -> tuple[list[Image.Image], Image.Image | None]:
    """Image-to-image and inpainting make an image of the input's size, so an input of another size
    than the one asked is resized to it first (as OpenAI's edits do: the output has the asked size)."""
    size = (sampling.width, sampling.height)
    if sampling.width is None or all(image.size == size for image in images):
        return images, mask
    resized = [image.resize(size, Image.Resampling.LANCZOS) for image in images]
    return resized, mask.resize(size, Image.Resampling.NEAREST) if mask is not None else None


def well_served_pixels(model: ResolvedModel) -> tuple[int, int] | None:
    """The pixel counts (width x height) near enough the model's default size to be served without
    a warning; None where the model has no default size."""
    trained = (model.defaults.height or 0) * (model.defaults.width or 0)
    return (trained // _SIZE_RATIO_WARNED, trained * _SIZE_RATIO_WARNED) if trained else None


def _warnings(model: ResolvedModel, sampling: SamplingParams, tokens: int | None) -> tuple[str, ...]:
    """What a caller should know about a request that is served, but not quite as asked."""
    warnings = []
    if tokens is not None and sampling.max_sequence_length is not None and tokens > sampling.max_sequence_length:
        warnings.append(f"prompt truncated: it has {tokens} tokens and the model reads the first "
                        f"{sampling.max_sequence_length} (max_sequence_length)")
    good = well_served_pixels(model)
    asked = (sampling.height or 0) * (sampling.width or 0)
    if good and asked and not good[0] <= asked <= good[1]:
        warnings.append(f"size {sampling.width}x{sampling.height} is far from the {model.defaults.width}x"
                        f"{model.defaults.height} {model.name!r} is made for: expect a poor image")
    return tuple(warnings)


def _edit_pipeline(model: ResolvedModel, prompt: PromptInput) -> tuple[str, Image.Image | None]:
    """Which pipeline runs the prompt ("main" or one of the family's edit_pipelines), and its mask."""
    family = model.family
    largest = max((max(image.size) for image in prompt.images), default=0)
    if largest > family.size.max:
        raise InvalidRequestError(f"input images may have sides of at most {family.size.max} pixels for "
                                  f"{family.name} models; got {largest}", "image")
    if (prompt.mask is not None or not family.is_edit) and prompt.images:
        smallest = min(min(image.size) for image in prompt.images)
        if smallest < family.size.min:
            raise InvalidRequestError(f"input images for image-to-image and inpainting need sides of at least "
                                      f"{family.size.min} pixels; got {smallest}", "image")
    if prompt.mask is not None:
        if not prompt.images:
            raise InvalidRequestError("a mask needs the image it applies to", "image")
        if "inpaint" not in family.edit_pipelines:
            raise InvalidRequestError(f"model {model.name!r} cannot inpaint: send the image without a mask", "mask")
        return "inpaint", inpainting_mask(prompt.mask, prompt.images[0].size)
    if prompt.images and not family.is_edit:
        if "image-to-image" not in family.edit_pipelines:
            raise InvalidRequestError(f"model {model.name!r} generates from text only and does not take input "
                                      "images", "image")
        if len(prompt.images) > 1:
            raise InvalidRequestError(f"image-to-image with {model.name!r} takes one image per request", "image")
        return "image-to-image", None
    return "main", None
