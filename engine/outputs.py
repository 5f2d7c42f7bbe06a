"""What a finished request gives back to callers of Omni and AsyncEngine, and the finished results
the online engine keeps to answer exact repeats."""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from PIL import Image

from configs.families import FamilyConfig
from engine.errors import error_for
from engine.intake.token_counts import image_tokens
from workers import GenerationFailure, GenerationPartial, GenerationRequest, GenerationResult
from workers.prompt_cache import BytesLru, image_digest


@dataclass(frozen=True)
class TokenUsage:
    """OpenAI's images `usage`: prompt tokens as the text encoder reads them, image tokens as DiT
    tokens (latent patches) of the input images and of the images made (engine/intake/token_counts.py)."""

    text_tokens: int = 0
    image_tokens: int = 0
    output_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(self.text_tokens + other.text_tokens, self.image_tokens + other.image_tokens,
                          self.output_tokens + other.output_tokens)


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
    usage: TokenUsage = TokenUsage()


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
    family: FamilyConfig, request: GenerationRequest, result: GenerationResult | GenerationFailure, submitted: float,
    queue_s: float = 0.0, repeated: bool = False,
) -> OmniRequestOutput:
    """The output for `request` to a model of `family`, or raise the error its failure stands for.
    `repeated`: `result` is an earlier identical request's, from the result cache."""
    if isinstance(result, GenerationFailure):
        raise error_for(result)
    timings = {"total_s": time.perf_counter() - submitted, "inference_s": result.inference_s, "queue_s": queue_s}
    if repeated:
        timings.update(inference_s=0.0, result_cache_hit=1)
    if result.step_s and not repeated:
        timings["step_s"] = sum(result.step_s) / len(result.step_s)
    if not repeated:
        timings.update(result.phases)
    if request.sampling.cache == "on":
        timings["cached_steps"] = result.cached_steps
    if result.prompt_cache_hits:
        timings["prompt_cache_hits"] = result.prompt_cache_hits
    if result.peak_memory_bytes is not None and not repeated:
        timings["peak_memory_mb"] = result.peak_memory_bytes / 2**20
    if result.compiled.graphs and not repeated:  # a shape not warmed up
        timings.update(compiled_graphs=result.compiled.graphs, compile_s=result.compiled.seconds,
                       compile_cache_hits=result.compiled.cache_hits)
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
        usage=TokenUsage(request.text_tokens, request.image_tokens,
                         sum(image_tokens(family, image.width, image.height) for image in result.images)),
    )


class ResultCache:
    """Finished results of requests that name their seed, keyed by everything that decides their
    images, so an identical request (an OpenAI client retrying after a timeout sends the same body)
    is answered without the ranks. Least recently used first out, bounded by the images' bytes. A
    request without a seed asks for a new picture and is never answered from here; neither is a
    streaming one (it expects previews)."""

    def __init__(self, max_bytes: int):
        self._store = BytesLru(max_bytes)

    def key(self, request: GenerationRequest, seeded: bool) -> Hashable | None:
        """None where the request may not be answered from the cache."""
        if self._store.max_bytes <= 0 or not seeded or request.sampling.partial_images:
            return None
        return (request.prompt, request.negative_prompt, request.seed, request.sampling, request.pipeline,
                request.loras, tuple(image_digest(image) for image in request.images),
                None if request.mask is None else image_digest(request.mask))

    def get(self, key: Hashable | None) -> GenerationResult | None:
        return None if key is None else self._store.get(key)

    def put(self, key: Hashable | None, result: GenerationResult) -> None:
        if key is not None:
            self._store.put(key, result, sum(image.width * image.height * len(image.getbands())
                                             for image in result.images))

    def clear(self) -> None:
        """After an adapter is loaded or unloaded: a name may now stand for other weights."""
        self._store.clear()
