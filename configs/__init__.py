"""Model-family configuration and the sampling knobs: data validated once into typed objects.

Every layer may read this package; it imports nothing from server/, engine/ or workers/.
"""

from configs.caching import CACHE_BACKENDS, CacheSettings
from configs.engine_options import DEFAULT_MODEL, DTYPES, LOAD_FORMATS, SCHEDULING, EngineOptions
from configs.families import (
    AttentionRule,
    BufferRule,
    BuiltinModel,
    FamilyConfig,
    HeadLayout,
    LayerRule,
    SizeLimits,
    TensorParallelPlan,
    TinyRecipe,
    builtin_model_entry,
    family_for_pipeline_class,
    load_all_families,
    load_builtin_models,
    load_family,
    load_published_models,
    load_text_encoder_plans,
)
from configs.sampling import (
    MAX_GUIDANCE_SCALE,
    MAX_INFERENCE_STEPS,
    MAX_LORA_SCALE,
    MAX_OUTPUTS_PER_PROMPT,
    MAX_PARTIAL_IMAGES,
    MAX_SEED,
    LoraAdapter,
    OmniDiffusionSamplingParams,
    SamplingParams,
    SamplingValueError,
)

__all__ = [
    "CACHE_BACKENDS",
    "CacheSettings",
    "DEFAULT_MODEL",
    "DTYPES",
    "EngineOptions",
    "LOAD_FORMATS",
    "SCHEDULING",
    "AttentionRule",
    "BufferRule",
    "BuiltinModel",
    "FamilyConfig",
    "HeadLayout",
    "LayerRule",
    "MAX_GUIDANCE_SCALE",
    "MAX_INFERENCE_STEPS",
    "MAX_LORA_SCALE",
    "MAX_OUTPUTS_PER_PROMPT",
    "MAX_PARTIAL_IMAGES",
    "MAX_SEED",
    "LoraAdapter",
    "OmniDiffusionSamplingParams",
    "SamplingParams",
    "SamplingValueError",
    "SizeLimits",
    "TensorParallelPlan",
    "TinyRecipe",
    "family_for_pipeline_class",
    "load_all_families",
    "builtin_model_entry",
    "load_builtin_models",
    "load_family",
    "load_published_models",
    "load_text_encoder_plans",
]
