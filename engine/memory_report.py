"""Per-rank parameter memory of a model under a rank layout, computed on the meta device.

Only config files are read, so it works for full-size models whose weights are not present (the
published ones resolve to the configurations in configs/published.yaml). Every component is built
and sharded exactly as the ranks build it (workers.sharded_loading), so the report is what loads.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.model_resolver import ResolvedModel
from workers import RankLayout
from workers.parallel_linear import shard_slices
from workers.sharded_loading import (
    ShardedComponent,
    build_meta_component,
    parameter_dtype,
    sharded_components,
    unsharded_models,
)
from workers.tensor_parallel import apply_plan


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


def memory_report(
    model: ResolvedModel, layout: RankLayout | int, dtype: torch.dtype, ranks: Iterable[int] | None = None,
    components: list[ShardedComponent] | None = None,
) -> list[RankMemory]:
    """Bytes per rank (all ranks, or those in `ranks`) as loading `model` under `layout` (or at a
    tensor-parallel size) holds them. Every rank holds its TP shard of the DiT (CFG and Ulysses
    groups replicate it); text encoders live on the driver's TP group only; the VAE on rank 0.

    components: what is sharded (default: as the ranks load it); the rest is held whole by rank 0.
    """
    layout = RankLayout(tensor_parallel_size=layout) if isinstance(layout, int) else layout
    world_size = layout.tensor_parallel_size
    components = sharded_components(model.family, model.path) if components is None else components
    sharded = {c.name: c for c in components}
    whole = {"transformers": 0, "diffusers": 0}  # what rank 0 holds whole: encoders without a plan, VAE
    for name, (library, class_name) in unsharded_models(model.path, set(sharded)).items():
        whole[library] += sum(_bytes(build_meta_component(library, class_name, model.path / name), dtype))
    built = {name: build_meta_component(c.library, c.class_name, model.path / name) for name, c in sharded.items()}
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


def format_size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.2f} MiB"


def format_report(model: ResolvedModel, layout: RankLayout | int, dtype_name: str, ranks: list[RankMemory]) -> str:
    layout = RankLayout(tensor_parallel_size=layout) if isinstance(layout, int) else layout
    header = ("rank", "DiT shard", "DiT replicated", "text enc. shard", "text enc. whole", "VAE", "total")
    rows = [header] + [
        (str(r.rank), *map(format_size, (r.dit_sharded, r.dit_replicated, r.text_encoders_sharded,
                                          r.text_encoders_replicated, r.vae, r.total)))
        for r in ranks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"{model.name} ({model.family.name}), {layout.describe()}, {dtype_name} parameters"]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)
