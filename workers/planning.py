"""What the engine may ask the parallel runtime before any rank starts: whether a model's
components split over a layout, and what each rank would hold.

The one entry from `engine` into the runtime's planning: every answer is computed from config
files on the meta device, by the same code the ranks load with, so a plan that passes here loads.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import FamilyConfig
from workers.decode_memory import decode_peak_bytes
from workers.messages import RankLayout
from workers.module_tree import owner_of
from workers.parallel.sharded_loading import (
    ShardedComponent,
    build_meta_component,
    component_config,
    dit_component,
    open_checkpoint,
    parameter_dtype,
    shard_on_meta,
    sharded_components,
    unsharded_models,
)
from workers.parallel.tensor_parallel import ShardPlanner, head_shares, layout_dims
from workers.quantization.gguf_files import find_gguf
from workers.quantization.schemes import Quantization
from workers.quantization.weights import QuantizedWeight
from workers.shard_slices import shard_slices


@dataclass(frozen=True)
class EncoderSplit:
    """How many of the driver's TP ranks a text encoder is sharded over (1: held whole by rank 0)."""

    name: str
    class_name: str
    size: int
    why: str  # the planner's reason it does not split over all of them; "" when it does


def text_encoder_splits(family: FamilyConfig, model_path: Path, tensor_parallel_size: int) -> list[EncoderSplit]:
    """Each text encoder with a TP plan over the largest number of the TP ranks (from the first)
    its heads split over: no layout is refused for a text encoder's sake."""
    splits = []
    for component in sharded_components(family, model_path)[1:]:
        config = component_config(component.library, component.class_name, model_path / component.name)
        why = ""
        for size in range(tensor_parallel_size, 0, -1):
            try:
                ShardPlanner(component.plan, config, rank=0, world_size=size)
                break
            except ValueError as exc:
                why = why or str(exc)
        splits.append(EncoderSplit(component.name, component.class_name, size, why))
    return splits


def describe_split(split: EncoderSplit, tensor_parallel_size: int) -> str:
    where = (f"sharded over TP ranks 0-{split.size - 1} of {tensor_parallel_size}" if split.size > 1
             else "held whole by rank 0")
    return f"{split.name} ({split.class_name}): {where}; {split.why}"


def check_tensor_split(family: FamilyConfig, model_path: Path, tensor_parallel_size: int,
                       quantization: str | None = None, transformer_file: str | None = None,
                       dummy: bool = False) -> None:
    """Raise ValueError when the DiT cannot split over the TP ranks, GGUF blocks included (those
    need the DiT built on meta and the file's header). Text encoders always fit: text_encoder_splits."""
    component = dit_component(family)
    config = component_config(component.library, component.class_name, model_path / component.name)
    ShardPlanner(component.plan, config, rank=0, world_size=tensor_parallel_size)
    asked = Quantization.parse(quantization, family.quantization)
    if asked is not None and asked.method == "gguf" and not dummy and find_gguf(
            model_path / "transformer", transformer_file) is None:
        raise ValueError(f"quantization='gguf' reads the DiT from a .gguf file: none in {model_path / 'transformer'}; "
                         "name one with --transformer-file (or use --load-format dummy with gguf:<type>)")
    if asked is not None and asked.method == "gguf" and tensor_parallel_size > 1:
        _shard_dit_on_meta(family, model_path, tensor_parallel_size, asked, transformer_file)


def _shard_dit_on_meta(family: FamilyConfig, model_path: Path, tensor_parallel_size: int,
                       quantization: Quantization, transformer_file: str | None, rank: int = 0) -> torch.nn.Module:
    """TP rank `rank`'s DiT on meta, split and quantized as loading does (raises where it cannot)."""
    component = dit_component(family)
    directory = model_path / component.name
    model = build_meta_component(component.library, component.class_name, directory)
    checkpoint = _gguf_header(model, directory, component, quantization, transformer_file)
    shard_on_meta(model, component, rank, tensor_parallel_size, torch.float32, quantization, checkpoint)
    return model


def _gguf_header(model, directory: Path, component: ShardedComponent, quantization: Quantization | None,
                 transformer_file: str | None):
    """The DiT's GGUF file when it is quantized that way and the file is here (its types decide
    the blocks); None otherwise (a dummy load's types)."""
    if quantization is None or quantization.method != "gguf" or not quantization.applies_to(component.name):
        return None
    if find_gguf(directory, transformer_file) is None:
        return None
    return open_checkpoint(model, directory, component, quantization, transformer_file)


def fewest_dit_heads(family: FamilyConfig, model_path: Path, tensor_parallel_size: int,
                     quantization: str | None = None, transformer_file: str | None = None) -> int:
    """The fewest query heads any TP rank holds in any attention layout of the DiT (Ulysses splits
    those). GGUF blocks may move head splits: then the last rank, which holds the fewest, is built
    on meta and its attention modules asked."""
    asked = Quantization.parse(quantization, family.quantization)
    if asked is not None and asked.method == "gguf" and tensor_parallel_size > 1:
        dit = _shard_dit_on_meta(family, model_path, tensor_parallel_size, asked, transformer_file,
                                 rank=tensor_parallel_size - 1)
        patterns = [rule.pattern for rule in family.tensor_parallel.attention]
        return min(module.heads for name, module in dit.named_modules()
                   if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))
    component = sharded_components(family, model_path)[0]
    config = component_config(component.library, component.class_name, model_path / component.name)
    fewest = []
    for layout in component.plan.layouts.values():
        heads, kv_heads, _ = layout_dims(config, layout)
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
    moved_splits: tuple[str, ...] = ()  # splits quantization blocks made uneven (tensor_parallel.apply_plan)

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
        stored = not tensor.is_floating_point() or isinstance(owner_of(module, name)[0], QuantizedWeight)
        kept = tensor.dtype if stored else parameter_dtype(module, name, dtype)
        size = tensor.numel() * kept.itemsize
        if shard_slices(tensor) is not None:
            sharded += size
        else:
            whole += size
    return sharded, whole


def rank_memory(
    family: FamilyConfig, model_path: Path, layout: RankLayout, dtype: torch.dtype,
    ranks: Iterable[int] | None = None, components: list[ShardedComponent] | None = None,
    quantization: str | None = None, transformer_file: str | None = None,
) -> list[RankMemory]:
    """Bytes per rank (all ranks, or those in `ranks`) as loading the model under `layout` holds them.
    Every rank holds its TP shard of the DiT (CFG and Ulysses groups replicate it); text encoders
    live on the driver's TP group only; the VAE on rank 0.

    components: what is sharded (default: as the ranks load it); the rest is held whole by rank 0.
    quantization: as `--quantization` (a DiT GGUF file in the folder is read for its types).
    """
    asked = Quantization.parse(quantization, family.quantization)
    world_size = layout.tensor_parallel_size
    components = sharded_components(family, model_path) if components is None else components
    sharded = {c.name: c for c in components}
    whole = {"transformers": 0, "diffusers": 0}  # what rank 0 holds whole: encoders without a plan, VAE
    for name, (library, class_name) in unsharded_models(model_path, set(sharded)).items():
        whole[library] += sum(_bytes(build_meta_component(library, class_name, model_path / name), dtype))
    built = {name: build_meta_component(c.library, c.class_name, model_path / name) for name, c in sharded.items()}
    headers = {name: _gguf_header(built[name], model_path / name, c, asked, transformer_file)  # read once
               for name, c in sharded.items()}
    splits = [s for s in text_encoder_splits(family, model_path, world_size) if s.name in sharded]
    split_sizes = {s.name: s.size for s in splits}
    notes = [describe_split(s, world_size) for s in splits if s.size < world_size]
    report = []
    for rank in range(layout.world_size) if ranks is None else ranks:
        cfg, ulysses, tp_rank = layout.coordinates(rank)
        counts, moved = {}, list(notes)
        for name, component in sharded.items():
            size = split_sizes.get(name, world_size)
            if name != "transformer" and ((cfg, ulysses) != (0, 0) or tp_rank >= size):
                continue
            module = copy.deepcopy(built[name])  # cheaper than building again (tables computed at init)
            moved.extend(f"{name}: {line}" for line in
                         shard_on_meta(module, component, tp_rank, size, dtype, asked, headers[name]))
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
            moved_splits=tuple(moved),
        ))
    return report


def vae_decode_peaks(model_path: Path, width: int, height: int, dtype: torch.dtype) -> dict[str, int]:
    """Peak activation bytes of one width x height decode by the pipeline's VAE, plain and tiled
    (--vae-use-tiling), measured on the meta device."""
    library, class_name = unsharded_models(model_path, set())["vae"]
    return {mode: decode_peak_bytes(model_path / "vae", class_name, width, height, dtype, tiling=mode == "tiled")
            for mode in ("whole", "tiled")}
