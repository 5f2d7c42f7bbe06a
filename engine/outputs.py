"""What a finished request gives back to callers of Omni and AsyncEngine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from PIL import Image
from workers import GROUP_BROKEN, GenerationFailure, GenerationRequest, GenerationResult

from engine.worker_group import WorkerGroupDied


class GenerationError(RuntimeError):
    """The worker could not produce an image for a request."""


@dataclass
class OmniRequestOutput:
    request_id: str
    prompt: str
    seed: int
    images: list[Image.Image]
    timings: dict[str, float] = field(default_factory=dict)


def output_from_result(
    request: GenerationRequest, result: GenerationResult | GenerationFailure, started: float
) -> OmniRequestOutput:
    """The output for `request`, or the error its failure stands for."""
    if isinstance(result, GenerationFailure):
        if result.error_type == GROUP_BROKEN:
            raise WorkerGroupDied(f"request {request.request_id} failed: a rank of the worker group died ({result.message})")
        raise GenerationError(f"request {request.request_id} failed: {result.message}")
    return OmniRequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        seed=result.seed,
        images=result.images,
        timings={"inference_s": result.inference_s, "total_s": time.perf_counter() - started},
    )
