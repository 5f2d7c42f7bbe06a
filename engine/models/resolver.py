"""Turns what a user passes as `model=` into a local diffusers folder and its model family.

Accepted: a built-in trained model ("builtin/shapes", the default), a built-in tiny model
("tiny/z-image", random weights), a local diffusers folder, or a Hugging Face hub id (looked up
in the local hub cache first, downloaded only when the hub is reachable). Where
only configurations are needed (the memory report, `--load-format dummy`), a published hub id
that is not on disk resolves to the configuration folder the project carries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub

from configs import (
    FamilyConfig,
    OmniDiffusionSamplingParams,
    builtin_model_entry,
    family_for_pipeline_class,
    load_builtin_models,
    load_family,
)
from engine.models.published_models import cached_published_configs, published_model_ids
from engine.models.tiny_models import TINY_PREFIX, cached_tiny_model, tiny_model_names

BUILTIN_PREFIX = "builtin/"
BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    family: FamilyConfig
    defaults: OmniDiffusionSamplingParams


def resolve_model(model: str, configs_only: bool = False) -> ResolvedModel:
    """Raise ValueError with what was wrong and what would work when `model` cannot be used.

    configs_only: the caller reads configurations, never weights.
    """
    if model.startswith(BUILTIN_PREFIX):
        return _builtin_model(model)
    if model.startswith(TINY_PREFIX):
        if model not in tiny_model_names():
            raise ValueError(f"unknown tiny model {model!r}; built-in: {', '.join(tiny_model_names())}")
        family = load_family(model.removeprefix(TINY_PREFIX))
        path = cached_tiny_model(model)
        return ResolvedModel(model, path, family, family.defaults.overridden_by(family.tiny.defaults))
    local = Path(model).expanduser()
    if local.is_dir():
        path = local
    elif configs_only and model in published_model_ids():
        path = _local_snapshot(model) or cached_published_configs(model)
    else:
        path = _hub_snapshot(model)
    family = _family_of(path, model)
    return ResolvedModel(model, path, family, family.defaults)


def builtin_model_names() -> list[str]:
    return [BUILTIN_PREFIX + name for name in load_builtin_models()]


def _builtin_model(model: str) -> ResolvedModel:
    entry = builtin_model_entry(model)
    if entry is None:
        raise ValueError(f"unknown built-in model {model!r}; built-in: {', '.join(builtin_model_names())}")
    path = BUILTIN_DIR / model.removeprefix(BUILTIN_PREFIX)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"built-in model {model!r} has no weights at {path}; train them with `{entry.trained_by}`")
    family = _family_of(path, model)
    return ResolvedModel(model, path, family, family.defaults.overridden_by(entry.defaults))


def _hub_snapshot(model: str) -> Path:
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise ValueError(
            f"model {model!r} is not a local directory, not a built-in model "
            f"({', '.join(builtin_model_names() + tiny_model_names())}) and not a Hugging Face id "
            "of the form 'org/name'"
        )
    snapshot = _local_snapshot(model)
    if snapshot is not None:
        return snapshot
    try:
        index = json.loads(Path(huggingface_hub.hf_hub_download(model, "model_index.json")).read_text())
        return Path(huggingface_hub.snapshot_download(model, allow_patterns=hub_allow_patterns(index)))
    except Exception as exc:
        raise ValueError(
            f"model {model!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}). Download it where the hub is reachable "
            f"(`hf download {model}`) and copy the cache to HF_HOME here, or pass the path of a "
            f"local diffusers folder"
        ) from None


# Inside a component folder: configs, tokenizer/processor files and safetensors weights; never the
# .bin/.pt/.ckpt/.onnx/.msgpack copies some repositories also carry.
_COMPONENT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")


def hub_allow_patterns(model_index: dict) -> list[str]:
    """The files of a diffusers repository the pipeline loads: model_index.json and the folders it
    names. FLUX.1 and SD3.5 repositories also hold single-file checkpoints (and SD3.5 a
    `text_encoders/` folder of them): 24-44 GB a diffusers pipeline never reads."""
    components = [name for name, entry in model_index.items() if not name.startswith("_") and isinstance(entry, list)]
    return ["model_index.json", *(f"{name}/{files}" for name in components for files in _COMPONENT_FILES)]


def _local_snapshot(model: str) -> Path | None:
    try:
        return Path(huggingface_hub.snapshot_download(model, local_files_only=True))
    except (huggingface_hub.errors.LocalEntryNotFoundError, huggingface_hub.errors.HFValidationError):
        return None


def _family_of(path: Path, model: str) -> FamilyConfig:
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model {model!r}: {path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipeline_class = json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"model {model!r}: {index} is not a valid model index ({exc})") from None
    return family_for_pipeline_class(pipeline_class)
