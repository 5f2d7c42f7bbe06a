"""Per-rank parameter memory of a model at a tensor-parallel size, computed on the meta device.

Only config files are read, so it works for full-size models whose weights are not present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import accelerate
import diffusers
import torch
import transformers

from engine.model_resolver import ResolvedModel
from workers.parallel_linear import shard_slices
from workers.sharded_loading import build_meta_transformer
from workers.tensor_parallel import apply_plan


@dataclass(frozen=True)
class RankMemory:
    rank: int
    dit_sharded: int
    dit_replicated: int
    text_encoders: int
    vae: int

    @property
    def total(self) -> int:
        return self.dit_sharded + self.dit_replicated + self.text_encoders + self.vae


def _element_count(module: torch.nn.Module) -> tuple[int, int]:
    """(elements in tensor-parallel shards, elements replicated on every rank)."""
    sharded = sum(p.numel() for p in module.parameters() if shard_slices(p) is not None)
    everything = sum(t.numel() for t in (*module.parameters(), *module.buffers()))
    return sharded, everything - sharded


def _component_elements(model: ResolvedModel, library_name: str) -> int:
    """Elements of every model component of `model` that comes from `library_name`, on meta."""
    index = json.loads((model.path / "model_index.json").read_text())
    total = 0
    for name, entry in index.items():
        if name.startswith("_") or name == "transformer" or not isinstance(entry, list) or entry[0] != library_name:
            continue
        component_class = getattr(transformers if library_name == "transformers" else diffusers, entry[1])
        with accelerate.init_empty_weights():
            if library_name == "transformers":
                if not issubclass(component_class, transformers.PreTrainedModel):
                    continue  # tokenizers, processors
                config = transformers.AutoConfig.from_pretrained(model.path / name)
                module = component_class._from_config(config)
            else:
                if not issubclass(component_class, diffusers.ModelMixin):
                    continue  # schedulers
                module = component_class.from_config(component_class.load_config(model.path / name))
        total += sum(_element_count(module))
    return total


def memory_report(model: ResolvedModel, world_size: int, dtype: torch.dtype) -> list[RankMemory]:
    element_size = torch.empty((), dtype=dtype).element_size()
    text_encoders = _component_elements(model, "transformers") * element_size
    vae = _component_elements(model, "diffusers") * element_size
    ranks = []
    for rank in range(world_size):
        transformer = build_meta_transformer(model.family, model.path / "transformer")
        apply_plan(transformer, model.family.tensor_parallel, rank, world_size)
        sharded, replicated = _element_count(transformer)
        on_driver = rank == 0
        ranks.append(RankMemory(
            rank=rank,
            dit_sharded=sharded * element_size,
            dit_replicated=replicated * element_size,
            text_encoders=text_encoders if on_driver else 0,
            vae=vae if on_driver else 0,
        ))
    return ranks


def format_report(model: ResolvedModel, world_size: int, dtype_name: str, ranks: list[RankMemory]) -> str:
    def size(count: int) -> str:
        return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.2f} MiB"

    header = ("rank", "DiT shard", "DiT replicated", "text encoders", "VAE", "total")
    rows = [header] + [
        (str(r.rank), size(r.dit_sharded), size(r.dit_replicated), size(r.text_encoders), size(r.vae), size(r.total))
        for r in ranks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"{model.name} ({model.family.name}), tensor_parallel_size={world_size}, {dtype_name} parameters"]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)
