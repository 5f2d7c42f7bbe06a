"""Omni: the offline Python API. Generates images synchronously through a worker group."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from configs import DEFAULT_MODEL, OmniDiffusionSamplingParams
from engine.errors import RequestTimedOut
from engine.intake.sampling import PromptInput, build_request
from engine.loras import LoraRegistry
from engine.models.resolver import ResolvedModel
from engine.outputs import OmniRequestOutput, PartialImage, output_from_result
from engine.parallel_config import DiffusionParallelConfig
from engine.startup import EngineConfig, start_group
from workers import AdapterInfo, GenerationBatch, GenerationPartial, GenerationRequest


class Omni:
    """Load `model` into worker processes and generate images with it.

    >>> with Omni(model="tiny/z-image") as omni:
    ...     image = omni.generate("a cat", OmniDiffusionSamplingParams(seed=1))[0].images[0]
    """

    def __init__(self, model: str = DEFAULT_MODEL, parallel_config: DiffusionParallelConfig | None = None,
                 **options):
        """options: any field of `configs.EngineOptions` (dtype, load_format, lora_modules,
        max_loras, text_encoder_offload, request_timeout_s, ...), with the same meaning as for
        the server. Two differ here: warm_up is off unless asked for, and the queue options
        (max_queue_size, max_batch_size, scheduling, max_active_requests, restart_workers) have no
        effect: `generate` runs its prompts in order. load_format="dummy" builds the full-size
        model from its configuration with random weights (a published hub id needs nothing on
        disk): latency and memory at true size. lora_modules: {name: path} of adapters to load now
        (more with `load_lora`); a request uses them through
        OmniDiffusionSamplingParams(loras=[LoraAdapter(name, scale)])."""
        self.config = EngineConfig(model=model, parallel_config=parallel_config or DiffusionParallelConfig(),
                                   **{"warm_up": False, **options})
        self.loras = LoraRegistry(self.config.max_loras, reserved_names={model})
        self.model: ResolvedModel
        self.model, self._group = start_group(self.config, self.loras)

    @property
    def parallel_config(self) -> DiffusionParallelConfig:
        return self.config.parallel_config

    def load_lora(self, name: str, path: str) -> AdapterInfo:
        """Load a LoRA adapter (a folder, a .safetensors file or a hub id) under `name`; raises
        LoraLoadError when it does not fit the model."""
        return self.loras.load(self._group, name, path)

    def unload_lora(self, name: str) -> None:
        self.loras.unload(self._group, name)

    def generate(
        self,
        prompts: str | dict | list[str | dict],
        sampling_params: OmniDiffusionSamplingParams | None = None,
        on_partial: Callable[[PartialImage], None] | None = None,
    ) -> list[OmniRequestOutput]:
        """One output per prompt, in order. With `partial_images` set in the params, `on_partial`
        gets each preview as it is made (called from the engine's reader thread).

        Raises InvalidRequestError (a ValueError) for bad input, GenerationError or WorkerGroupDied
        on failure (engine.errors).
        """
        params = sampling_params or OmniDiffusionSamplingParams()
        items = prompts if isinstance(prompts, list) else [prompts]
        requests = [build_request(self.model, PromptInput.from_user(item), params, self.loras,
                                  self.config.max_megapixel_steps, self.config.cache_settings) for item in items]
        started = time.perf_counter()
        futures = [self._group.submit(GenerationBatch([request]), _partial_handlers(request, index, on_partial))[0]
                   for index, request in enumerate(requests)]
        try:
            deadline = None if self.config.request_timeout_s is None else started + self.config.request_timeout_s
            return [output_from_result(self.model.family, request, _interruptible_result(future, deadline), started)
                    for request, future in zip(requests, futures)]
        except BaseException:  # KeyboardInterrupt included: stop the work nobody will collect
            for request, future in zip(requests, futures):
                if not future.done():
                    self._group.cancel(request.request_id)
            raise

    def rank_parameter_bytes(self) -> list[dict[str, int]]:
        """Per rank, the bytes each loaded component holds (followers: only their DiT shard)."""
        return [self._group.parameter_bytes[rank] for rank in range(self.parallel_config.world_size)]

    def rank_pids(self) -> list[int]:
        """The process id of every rank, rank 0 first (empty once closed)."""
        return self._group.pids

    def close(self) -> None:
        self._group.close()

    def __enter__(self) -> "Omni":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _interruptible_result(future: Future, deadline: float | None):
    """future.result(), waking every 100 ms: a Ctrl-C delivered to another thread still reaches us.
    Past `deadline` (perf_counter) it raises RequestTimedOut (the caller cancels what is left)."""
    while True:
        try:
            return future.result(timeout=0.1)
        except FutureTimeout:
            if deadline is not None and time.perf_counter() > deadline:
                raise RequestTimedOut("the request did not finish within request_timeout_s") from None


def _partial_handlers(
    request: GenerationRequest, prompt_index: int, on_partial: Callable[[PartialImage], None] | None,
) -> dict[str, Callable[[GenerationPartial], None]]:
    if on_partial is None:
        return {}
    return {request.request_id: lambda event: on_partial(PartialImage.of(event, prompt_index))}
