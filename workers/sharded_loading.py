"""Loads this rank's shard of the DiT without ever materialising the full model.

The transformer is built with parameters on the meta device (buffers stay real), the TP plan is
applied, and each parameter is then read from the safetensors files: sharded ones as slices
(`safe_open(...).get_slice`), the rest whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import accelerate
import diffusers
import torch
from safetensors import safe_open
from torch import nn

from configs import FamilyConfig
from workers.parallel_linear import ShardSlices, set_shard_slices, shard_slices
from workers.tensor_parallel import apply_plan


def build_meta_transformer(family: FamilyConfig, transformer_dir: Path) -> nn.Module:
    """The transformer with every parameter on the meta device (no memory), eval mode."""
    model_class = getattr(diffusers, family.transformer_class)
    config = model_class.load_config(transformer_dir)
    with accelerate.init_empty_weights(include_buffers=False):
        model = model_class.from_config(config)
    return model.eval().requires_grad_(False)


def load_transformer_shard(
    family: FamilyConfig, transformer_dir: Path, rank: int, world_size: int,
    device: torch.device, dtype: torch.dtype,
) -> nn.Module:
    model = build_meta_transformer(family, transformer_dir)
    if world_size > 1:
        apply_plan(model, family.tensor_parallel, rank, world_size)
    _load_parameters(model, _tensor_files(transformer_dir), device, dtype)
    _cast_buffers(model, dtype)
    return model.to(device=device)


def _dtype_for(model: nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """float32 for the modules the model class says must stay in float32, else `dtype`."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return torch.float32 if any(part in keep for part in name.split(".")) else dtype


def _cast_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            owner_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[attribute] = buffer.to(_dtype_for(model, name, dtype))


def _tensor_files(transformer_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    indexes = list(transformer_dir.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return {name: transformer_dir / file for name, file in weight_map.items()}
    files = {}
    for path in sorted(transformer_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {transformer_dir}")
    return files


def _load_parameters(model: nn.Module, files: dict[str, Path], device: torch.device, dtype: torch.dtype) -> None:
    wanted = dict(model.named_parameters())
    wanted.update((n, b) for n, b in model.named_buffers() if n in files)
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name in names:
                tensor = _read(handle, name, shard_slices(wanted[name]))
                if tensor.is_floating_point():
                    tensor = tensor.to(_dtype_for(model, name, dtype))
                _assign(model, name, tensor.to(device), wanted[name])


def _read(handle, name: str, slices: ShardSlices | None) -> torch.Tensor:
    if slices is None:
        return handle.get_tensor(name)
    view = handle.get_slice(name)
    index = [slice(None)] * len(view.get_shape())
    parts = []
    for start, end in slices.ranges:
        index[slices.dim] = slice(start, end)
        parts.append(view[tuple(index)])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=slices.dim)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, current: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(current.shape):
        raise ValueError(
            f"{name}: checkpoint slice has shape {tuple(tensor.shape)}, model expects {tuple(current.shape)}")
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attribute in owner._parameters:
        replacement = nn.Parameter(tensor, requires_grad=False)
        set_shard_slices(replacement, shard_slices(current))
        owner._parameters[attribute] = replacement
    else:
        owner._buffers[attribute] = tensor
