"""What a finished request gives back to callers of Omni and AsyncEngine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from PIL import Image

from engine.errors import error_for
from workers import GenerationFailure, GenerationPartial, GenerationRequest, GenerationResult


@dataclass
class OmniRequestOutput:
    request_id: str
    prompt: str
    seed: int  # the request's seed; image i was drawn from seed + i (see `seeds`)
    images: list[Image.Image]
    seeds: list[int] = field(default_factory=list)
    num_inference_steps: int = 0
    batch_images: int = 1  # images in the pipeline call that produced this output
    timings: dict[str, float] = field(default_factory=dict)  # total_s, inference_s, queue_s, step_s (mean)
    warnings: list[str] = field(default_factory=list)  # served, but not quite as asked (prompt truncated, ...)


@dataclass
class PartialImage:
    """A streamed preview: the model's current estimate of one image, decoded at the asked size."""

    prompt_index: int  # which prompt of the call (Omni.generate takes several; AsyncEngine one)
    image_index: int  # which of that prompt's images
    partial_index: int  # 0-based, in the order sent
    image: Image.Image

    @classmethod
    def of(cls, event: GenerationPartial, prompt_index: int = 0) -> PartialImage:
        return cls(prompt_index, event.image_index, event.partial_index, event.image)


def output_from_result(
    request: GenerationRequest, result: GenerationResult | GenerationFailure, submitted: float, queue_s: float = 0.0
) -> OmniRequestOutput:
    """The output for `request`, or raise the error its failure stands for."""
    if isinstance(result, GenerationFailure):
        raise error_for(result)
    timings = {"total_s": time.perf_counter() - submitted, "inference_s": result.inference_s, "queue_s": queue_s}
    if result.step_s:
        timings["step_s"] = sum(result.step_s) / len(result.step_s)
    if request.sampling.cache == "on":
        timings["cached_steps"] = result.cached_steps
    return OmniRequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        seed=request.seed,
        images=result.images,
        seeds=result.seeds,
        num_inference_steps=request.sampling.num_inference_steps,
        batch_images=result.batch_images,
        timings=timings,
        warnings=list(request.warnings),
    )
