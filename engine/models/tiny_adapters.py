"""Random LoRA adapters for a pipeline, written offline in diffusers' own LoRA format.

For tests (every family, every tensor-parallel split style) and benchmarks: an adapter touches
every Linear layer of the DiT's blocks (attention, feed-forward, modulation: column- and
row-parallel layers alike) and, where asked, the attention and MLP layers of the pipeline's
first text encoder. Both factors are random (a freshly trained PEFT adapter starts with B = 0,
which would change nothing).
"""

from __future__ import annotations

import re
from pathlib import Path

import diffusers
import torch
from torch import nn

from engine.models.resolver import resolve_model

_DIT_LAYERS = re.compile(r".*(blocks|layers)\.\d+\..*")
_TEXT_ENCODER_LAYERS = re.compile(r".*layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def _random_pairs(model: nn.Module, pattern: re.Pattern, rank: int, generator: torch.Generator,
                  strength: float) -> dict[str, torch.Tensor]:
    """B A of about `strength` times a unit-variance layer's effect, whatever the layer's width."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and pattern.match(name):
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=generator) * strength / rank**0.5
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
    return tensors


def _saved_config(tensors: dict[str, torch.Tensor], rank: int, alpha: float) -> dict:
    """The LoRA config PEFT saves beside its weights."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted({key.split(".lora_")[0] for key in tensors})}


def build_random_adapter(model: str, path: Path, rank: int = 4, seed: int = 0, alpha: float | None = None,
                         text_encoder: bool = False, strength: float = 1.0) -> Path:
    """Write a random adapter for `model` (a name the resolver knows, e.g. "tiny/flux") into the
    folder `path`; returns the folder. `alpha` is saved in the file's LoRA config (None: no config,
    so the reader assumes alpha = rank); `text_encoder` adds layers of the first text encoder
    (the families whose diffusers pipeline loads text-encoder LoRA: FLUX.1, SD3)."""
    resolved = resolve_model(model)
    pipeline_class = getattr(diffusers, resolved.family.pipeline_class)
    generator = torch.Generator().manual_seed(seed)
    transformer = getattr(diffusers, resolved.family.transformer_class).from_pretrained(resolved.path / "transformer")
    components = {"transformer": _random_pairs(transformer, _DIT_LAYERS, rank, generator, strength)}
    if text_encoder:
        if "text_encoder" not in pipeline_class._lora_loadable_modules:
            raise ValueError(f"{resolved.family.pipeline_class} loads no text-encoder LoRA")
        pipeline = diffusers.DiffusionPipeline.from_pretrained(resolved.path, transformer=transformer)
        components["text_encoder"] = _random_pairs(pipeline.text_encoder, _TEXT_ENCODER_LAYERS, rank, generator,
                                                   strength)
    layers = {}
    for name, tensors in components.items():
        layers[f"{name}_lora_layers"] = tensors
        if alpha is not None:
            layers[f"{name}_lora_adapter_metadata"] = _saved_config(tensors, rank, alpha)
    path.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(path, **layers)
    return path
