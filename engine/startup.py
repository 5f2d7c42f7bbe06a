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
from workers import CompileStats, GenerationBatch, GenerationFailure

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
            _warm_up(model, group, config.warmup_dimensions)
    except BaseException:
        group.close()
        raise
    return model, group


# What a compiled block's graph depends on besides sizes (all symbolic): one image or several, and
# whether the rows' prompts differ in length (Z-Image then passes an attention mask). So: one image;
# two without guidance; two with guidance and a negative prompt (batched or separate CFG calls).
_LONG_PROMPT = "a long warm-up prompt " * 12
_WARM_UP_RUNS = (
    ("warm-up", None, {}),
    (_LONG_PROMPT, None, {"num_outputs_per_prompt": 2, "guidance_scale": 0.0, "true_cfg_scale": 1.0}),
    (_LONG_PROMPT, "blurry", {"num_outputs_per_prompt": 2, "guidance_scale": 4.0, "true_cfg_scale": 4.0}),
)


def _warm_up(model: ResolvedModel, group: WorkerGroup, sizes: list[tuple[int, int]]) -> CompileStats:
    """Eager: one generation with the fewest steps the family allows, at the smallest size, so the
    first user request is not the slow one. Compiled: at each of `sizes` (default: the family's
    default size), the _WARM_UP_RUNS, which compile every graph requests will run."""
    started = time.perf_counter()
    if group.spec.compiled:
        defaults = model.defaults
        sizes, runs = sizes or [(defaults.width, defaults.height)], _WARM_UP_RUNS
    else:
        sizes, runs = [(model.family.size.min, model.family.size.min)], _WARM_UP_RUNS[:1]
    compiled = CompileStats()
    for width, height in sizes:
        images = [Image.new("RGB", (width, height), (127, 127, 127))] if model.family.is_edit else []
        for prompt, negative, values in runs:
            request = build_request(model, PromptInput(prompt, negative, images=images), OmniDiffusionSamplingParams(
                width=width, height=height, num_inference_steps=model.family.min_inference_steps, seed=0,
                cache="off", **values))
            result = group.submit(GenerationBatch([request]))[0].result()
            if isinstance(result, GenerationFailure):
                raise GenerationError(f"warm-up generation at {width}x{height} failed: {error_for(result)}")
            compiled += result.compiled
    logger.info("warm-up done in %.2f s%s", time.perf_counter() - started,
                f" ({compiled.graphs} graph(s) compiled at {', '.join(f'{w}x{h}' for w, h in sizes)}, "
                f"{compiled.cache_hits} read from the compile cache)" if group.spec.compiled else "")
    return compiled
