"""Omni: the offline Python API. Generates images synchronously through a worker group."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from PIL import Image
from workers import GROUP_BROKEN, GenerationFailure, GenerationRequest, OmniDiffusionSamplingParams

from engine.model_resolver import DEFAULT_MODEL, ResolvedModel, resolve_model
from engine.parallel_config import DiffusionParallelConfig, worker_spec
from engine.sampling import PromptInput, build_request
from engine.worker_group import WorkerGroup, WorkerGroupDied


class GenerationError(RuntimeError):
    """The worker could not produce an image for a request."""


@dataclass
class OmniRequestOutput:
    request_id: str
    prompt: str
    seed: int
    images: list[Image.Image]
    timings: dict[str, float] = field(default_factory=dict)


class Omni:
    """Load `model` into worker processes and generate images with it.

    >>> with Omni(model="tiny/z-image") as omni:
    ...     image = omni.generate("a cat", OmniDiffusionSamplingParams(seed=1))[0].images[0]
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        parallel_config: DiffusionParallelConfig | None = None,
        dtype: str = "auto",
    ):
        self.parallel_config = parallel_config or DiffusionParallelConfig()
        self.model: ResolvedModel = resolve_model(model)
        self._group = WorkerGroup(worker_spec(self.model, self.parallel_config, dtype))
        self._group.start()

    def generate(
        self,
        prompts: str | dict | list[str | dict],
        sampling_params: OmniDiffusionSamplingParams | None = None,
    ) -> list[OmniRequestOutput]:
        """One output per prompt, in order. Raises ValueError for bad input, GenerationError on failure."""
        params = sampling_params or OmniDiffusionSamplingParams()
        items = prompts if isinstance(prompts, list) else [prompts]
        requests = [build_request(self.model, PromptInput.from_user(item), params) for item in items]
        started = time.perf_counter()
        futures = [self._group.submit(request) for request in requests]
        return [self._output(request, future.result(), started) for request, future in zip(requests, futures)]

    @staticmethod
    def _output(request: GenerationRequest, result, started: float) -> OmniRequestOutput:
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

    def rank_parameter_bytes(self) -> list[dict[str, int]]:
        """Per rank, the bytes each loaded component holds (followers: only their DiT shard)."""
        return [self._group.parameter_bytes[rank] for rank in range(self.parallel_config.tensor_parallel_size)]

    def close(self) -> None:
        self._group.close()

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
