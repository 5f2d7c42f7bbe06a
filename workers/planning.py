"""What the engine may ask the parallel runtime before any rank starts: whether a model's
components split over a layout, and what each rank would hold.

The one entry from `engine` into the runtime's planning: every answer is computed from config
files on the meta device, by the same code the ranks load with, so a plan that passes here loads.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import FamilyConfig
from workers.messages import RankLayout
from workers.parallel.parallel_linear import shard_slices
from workers.parallel.sharded_loading import (
    ShardedComponent,
    build_meta_component,
    component_config,
    parameter_dtype,
    sharded_components,
    unsharded_models,
)
from workers.parallel.tensor_parallel import ShardPlanner, apply_plan, config_value, head_shares


def check_tensor_split(family: FamilyConfig, model_path: Path, tensor_parallel_size: int) -> None:
    """Raise ValueError (naming the component) when a sharded component cannot split over the TP ranks."""
    for component in sharded_components(family, model_path):
        config = component_config(component.library, component.class_name, model_path / component.name)
        try:
            ShardPlanner(component.plan, config, rank=0, world_size=tensor_parallel_size)
        except ValueError as exc:
            if component.name == "transformer":
                raise
            raise ValueError(f"{component.name} ({component.class_name}): {exc}") from None


def fewest_dit_heads(family: FamilyConfig, model_path: Path, tensor_parallel_size: int) -> int:
    """The fewest query heads any TP rank holds in any attention layout of the DiT (Ulysses splits those)."""
    component = sharded_components(family, model_path)[0]
    config = component_config(component.library, component.class_name, model_path / component.name)
    fewest = []
    for layout in component.plan.layouts.values():
        heads = config_value(config, layout.heads)
        kv_heads = config_value(config, layout.kv_heads) if layout.kv_heads else heads
        shares = head_shares(heads, kv_heads, 1, tensor_parallel_size, layout.heads)
        fewest.append(min(share.local_heads for share in shares))
    return min(fewest)


@dataclass(frozen=True)
class RankMemory:
    rank: int
    dit_sharded: int
    dit_replicated: int
    text_encoders_sharded: int
    text_encoders_replicated: int  # replicated parts of sharded encoders, plus whole encoders (rank 0)
    vae: int

    @property
    def dit(self) -> int:
        return self.dit_sharded + self.dit_replicated

    @property
    def text_encoders(self) -> int:
        return self.text_encoders_sharded + self.text_encoders_replicated

    @property
    def total(self) -> int:
        return self.dit + self.text_encoders + self.vae


def _bytes(module: torch.nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes in tensor-parallel shards, bytes held whole), in the dtypes loading gives them."""
    sharded = whole = 0
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        kept = tensor.dtype if not tensor.is_floating_point() else parameter_dtype(module, name, dtype)
        size = tensor.numel() * kept.itemsize
        if shard_slices(tensor) is not None:
            sharded += size
        else:
            whole += size
    return sharded, whole


def rank_memory(
    family: FamilyConfig, model_path: Path, layout: RankLayout, dtype: torch.dtype,
    ranks: Iterable[int] | None = None, components: list[ShardedComponent] | None = None,
) -> list[RankMemory]:
    """Bytes per rank (all ranks, or those in `ranks`) as loading the model under `layout` holds them.
    Every rank holds its TP shard of the DiT (CFG and Ulysses groups replicate it); text encoders
    live on the driver's TP group only; the VAE on rank 0.

    components: what is sharded (default: as the ranks load it); the rest is held whole by rank 0.
    """
    world_size = layout.tensor_parallel_size
    components = sharded_components(family, model_path) if components is None else components
    sharded = {c.name: c for c in components}
    whole = {"transformers": 0, "diffusers": 0}  # what rank 0 holds whole: encoders without a plan, VAE
    for name, (library, class_name) in unsharded_models(model_path, set(sharded)).items():
        whole[library] += sum(_bytes(build_meta_component(library, class_name, model_path / name), dtype))
    built = {name: build_meta_component(c.library, c.class_name, model_path / name) for name, c in sharded.items()}
    report = []
    for rank in range(layout.world_size) if ranks is None else ranks:
        cfg, ulysses, tp_rank = layout.coordinates(rank)
        counts = {}
        for name, component in sharded.items():
            if name != "transformer" and (cfg, ulysses) != (0, 0):
                continue
            module = copy.deepcopy(built[name])  # cheaper than building again (tables computed at init)
            if world_size > 1:
                apply_plan(module, component.plan, tp_rank, world_size)
            counts[name] = _bytes(module, dtype)
        encoders = [counts[name] for name in counts if name != "transformer"]
        on_driver = rank == 0
        report.append(RankMemory(
            rank=rank,
            dit_sharded=counts["transformer"][0],
            dit_replicated=counts["transformer"][1],
            text_encoders_sharded=sum(s for s, _ in encoders),
            text_encoders_replicated=sum(r for _, r in encoders) + whole["transformers"] * on_driver,
            vae=whole["diffusers"] * on_driver,
        ))
    return report
