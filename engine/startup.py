"""EngineConfig, and the one start path Omni and AsyncEngine share: resolve the model, plan its
ranks, spawn and load them, load the LoRA adapters, warm up."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from PIL import Image

from configs import DEFAULT_MODEL, EngineOptions, OmniDiffusionSamplingParams
from configs.caching import CacheSettings
from engine.errors import GenerationError, error_for
from engine.intake.sampling import PromptInput, build_request
from engine.loras import LoraRegistry
from engine.models.resolver import ResolvedModel, resolve_model
from engine.parallel_config import DiffusionParallelConfig, checked_offload, worker_spec
from engine.worker_group import WorkerGroup
from workers import GenerationBatch, GenerationFailure

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig(EngineOptions):
    """Every engine option (configs.EngineOptions: their defaults and meaning), plus the model and its layout."""

    model: str = DEFAULT_MODEL
    parallel_config: DiffusionParallelConfig = DiffusionParallelConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        checked_offload(self.offload)
        self.cache_settings  # magcache on a model whose ratios are not known: ValueError

    @property
    def cache_settings(self) -> CacheSettings:
        return CacheSettings.of(self.cache_backend, self.cache_config, self.model)


def start_group(config: EngineConfig, loras: LoraRegistry, restart: bool = False,
                on_death: Callable[[str], None] | None = None) -> tuple[ResolvedModel, WorkerGroup]:
    """Resolve, spawn, load, load the adapters and warm up (blocking). A restart loads the adapters
    that were loaded before, from the same files; the first start those of `config.lora_modules`."""
    model = resolve_model(config.model, configs_only=config.load_format == "dummy")
    model = dataclasses.replace(model, defaults=model.defaults.overridden_by(config.default_overrides))
    group = WorkerGroup(worker_spec(model, config.parallel_config, config), config.startup_timeout_s, on_death)
    group.start()
    try:
        if restart:
            loras.reload_into(group)
        else:
            loras.load_all(group, config.lora_modules)
        if config.warm_up:
            _warm_up(model, group)
    except BaseException:
        group.close()
        raise
    return model, group


def _warm_up(model: ResolvedModel, group: WorkerGroup) -> None:
    """One generation with the fewest steps the family allows, at the smallest size, so the first
    user request is not the slow one."""
    started = time.perf_counter()
    side = model.family.size.min
    images = [Image.new("RGB", (side, side), (127, 127, 127))] if model.family.is_edit else []
    request = build_request(model, PromptInput("warm-up", images=images), OmniDiffusionSamplingParams(
        num_inference_steps=model.family.min_inference_steps, seed=0, cache="off"))
    result = group.submit(GenerationBatch([request]))[0].result()
    if isinstance(result, GenerationFailure):
        raise GenerationError(f"warm-up generation failed: {error_for(result)}")
    logger.info("warm-up generation done in %.2f s", time.perf_counter() - started)
