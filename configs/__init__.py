"""Model-family configuration: one YAML file per family, validated once into typed objects.

Every layer may read this package; it imports nothing from server/, engine/ or workers/.
"""

from configs.families import (
    FamilyConfig,
    SamplingDefaults,
    LayerRule,
    SizeLimits,
    TensorParallelPlan,
    TinyRecipe,
    family_for_pipeline_class,
    load_family,
    load_all_families,
)

__all__ = [
    "FamilyConfig",
    "SamplingDefaults",
    "LayerRule",
    "SizeLimits",
    "TensorParallelPlan",
    "TinyRecipe",
    "family_for_pipeline_class",
    "load_family",
    "load_all_families",
]
