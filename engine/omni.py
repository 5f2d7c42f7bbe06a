"""Omni: the offline Python API. Generates images synchronously through a worker group."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from configs import (
    DEFAULT_MAX_LORA_RANK,
    DEFAULT_MAX_LORAS,
    DEFAULT_MODEL,
    DEFAULT_STARTUP_TIMEOUT_S,
    OmniDiffusionSamplingParams,
)
from engine.loras import LoraRegistry
from engine.model_resolver import ResolvedModel, resolve_model
from engine.outputs import OmniRequestOutput, PartialImage, output_from_result
from engine.parallel_config import DiffusionParallelConfig, worker_spec
from engine.sampling import PromptInput, build_request
from engine.worker_group import WorkerGroup
from workers import AdapterInfo, GenerationBatch, GenerationPartial, GenerationRequest


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
        load_format: str = "auto",
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        lora_modules: dict[str, str] | None = None,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        text_encoder_offload: str | None = None,
        vae_offload: str | None = None,
    ):
        """load_format="dummy" builds the full-size model from its configuration with random
        weights (a published hub id needs nothing on disk): latency and memory at true size.
        lora_modules: {name: path} of LoRA adapters to load now (more with `load_lora`); a request
        uses them through OmniDiffusionSamplingParams(loras=[LoraAdapter(name, scale)]).
        text_encoder_offload / vae_offload: a device ("cpu") those models stay on between uses,
        brought to the rank's device for each use."""
        self.parallel_config = parallel_config or DiffusionParallelConfig()
        self.model: ResolvedModel = resolve_model(model, configs_only=load_format == "dummy")
        spec = worker_spec(self.model, self.parallel_config, dtype, load_format, max_loras, max_lora_rank,
                           {"text_encoder": text_encoder_offload, "vae": vae_offload})
        self.loras = LoraRegistry(max_loras, reserved_names={model})
        self._group = WorkerGroup(spec, startup_timeout_s)
        self._group.start()
        try:
            self.loras.load_all(self._group, lora_modules or {})
        except BaseException:
            self._group.close()
            raise

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
        requests = [build_request(self.model, PromptInput.from_user(item), params, self.loras) for item in items]
        started = time.perf_counter()
        futures = [self._group.submit(GenerationBatch([request]), _partial_handlers(request, index, on_partial))[0]
                   for index, request in enumerate(requests)]
        try:
            return [output_from_result(r, _interruptible_result(f), started) for r, f in zip(requests, futures)]
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


def _interruptible_result(future: Future):
    """future.result(), waking every 100 ms: a Ctrl-C delivered to another thread still reaches us."""
    while True:
        try:
            return future.result(timeout=0.1)
        except FutureTimeout:
            continue


def _partial_handlers(
    request: GenerationRequest, prompt_index: int, on_partial: Callable[[PartialImage], None] | None,
) -> dict[str, Callable[[GenerationPartial], None]]:
    if on_partial is None:
        return {}
    return {request.request_id: lambda event: on_partial(PartialImage.of(event, prompt_index))}
