"""Typed view of the per-family YAML files in this folder."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from configs.sampling import OmniDiffusionSamplingParams, SamplingValueError

CONFIG_DIR = Path(__file__).resolve().parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SizeLimits(_Strict):
    multiple_of: int
    min: int
    max: int

    def check_side(self, name: str, value: int) -> None:
        """Raise SamplingValueError naming the sizes that work when `value` is not one of them."""
        if value % self.multiple_of or not self.min <= value <= self.max:
            raise SamplingValueError(
                f"{name}={value} is not supported: height and width must be multiples of "
                f"{self.multiple_of} between {self.min} and {self.max} (for example {self.nearest(value)})",
                name,
            )

    def nearest(self, value: int) -> int:
        rounded = round(value / self.multiple_of) * self.multiple_of
        return max(self.min, min(self.max, rounded))


class LayerRule(_Strict):
    """Linears whose full name matches `pattern` are split: colwise (outputs), colwise_gather (outputs,
    gathered whole again after the layer: for small outputs like adaLN modulation), rowwise (inputs),
    or packed_rowwise (inputs are cat([per-head part, evenly split part])). `split` says how."""

    pattern: str
    style: Literal["colwise", "colwise_gather", "rowwise", "packed_rowwise"]
    split: Literal["heads", "even", "heads+even"]
    optional: bool = False  # the pattern may match nothing (a variant of the family lacks it)


class TensorParallelPlan(_Strict):
    heads_key: str  # transformer config key holding the number of attention heads
    head_dim_key: str | None = None  # config key holding head_dim ...
    dim_key: str | None = None  # ... or the model width, head_dim = width / heads
    attention: list[str]  # attention modules whose `heads` becomes this rank's head count
    layers: list[LayerRule]


class TinyRecipe(_Strict):
    """Numbers of the built-in tiny variant: component configs and sampling overrides."""

    model_config = ConfigDict(extra="allow", frozen=True)
    seed: int = 0
    defaults: OmniDiffusionSamplingParams = OmniDiffusionSamplingParams()
    transformer: dict[str, Any]

    def component(self, name: str) -> dict[str, Any]:
        return dict(getattr(self, name))


class FamilyConfig(_Strict):
    name: str
    pipeline_class: str
    transformer_class: str
    task: Literal["text-to-image", "image-edit"]
    defaults: OmniDiffusionSamplingParams
    tensor_parallel: TensorParallelPlan
    size: SizeLimits
    tiny: TinyRecipe

    @property
    def is_edit(self) -> bool:
        return self.task == "image-edit"


@functools.cache
def load_all_families() -> dict[str, FamilyConfig]:
    families = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        family = FamilyConfig.model_validate(yaml.safe_load(path.read_text()))
        families[family.name] = family
    return families


def load_family(name: str) -> FamilyConfig:
    families = load_all_families()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(families)}")
    return families[name]


def family_for_pipeline_class(pipeline_class: str) -> FamilyConfig:
    for family in load_all_families().values():
        if family.pipeline_class == pipeline_class:
            return family
    supported = ", ".join(f"{f.name} ({f.pipeline_class})" for f in load_all_families().values())
    raise ValueError(f"pipeline class {pipeline_class!r} is not supported; supported families: {supported}")
