"""Loads this rank's shard of a pipeline component (the DiT, a text encoder) without ever
materialising the whole component, and the models the driver holds whole.

The component is built with parameters on the meta device (buffers stay real), its TP plan is
applied, and each parameter is then read from the safetensors files (one file, or several with an
index): sharded ones as slices (`safe_open(...).get_slice`), the rest whole. transformers models
whose checkpoints use older key names are read through transformers' own renaming table.
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import diffusers
import torch
import transformers
from safetensors import safe_open
from torch import nn

from configs import FamilyConfig, TensorParallelPlan, load_text_encoder_plans
from workers.module_tree import owner_of
from workers.parallel.tensor_parallel import apply_plan
from workers.quantization.gguf_files import GgufCheckpoint, find_gguf
from workers.quantization.original_names import RowCheckpoint
from workers.quantization.schemes import (
    Quantization,
    fill_randomly,
    quantize_layers,
    quantized_weights,
    read_quantized,
    weight_formats,
)
from workers.quantization.weights import QuantizedWeight
from workers.shard_slices import ShardSlices, set_shard_slices, shard_slices

logger = logging.getLogger(__name__)
_READ_AHEAD = 4  # tensors read but not yet copied, at most (bounds the host memory in flight)


@dataclass(frozen=True)
class ShardedComponent:
    """A pipeline component every rank holds a slice of."""

    name: str  # its name in the pipeline: "transformer", "text_encoder", ...
    library: str  # "diffusers" or "transformers"
    class_name: str
    plan: TensorParallelPlan


def dit_component(family: FamilyConfig) -> ShardedComponent:
    return ShardedComponent("transformer", "diffusers", family.transformer_class, family.tensor_parallel)


def sharded_components(family: FamilyConfig, model_path: Path) -> list[ShardedComponent]:
    """The DiT and every text encoder that has a TP plan (configs/text_encoders.yaml)."""
    index = json.loads((model_path / "model_index.json").read_text())
    components = [dit_component(family)]
    plans = load_text_encoder_plans()
    for name, entry in index.items():
        if isinstance(entry, list) and entry[0] == "transformers" and entry[1] in plans:
            components.append(ShardedComponent(name, "transformers", entry[1], plans[entry[1]]))
    return components


def component_config(library: str, class_name: str, directory: Path):
    """The component's configuration: a transformers config object, or diffusers' config dict."""
    if library == "transformers":
        return transformers.AutoConfig.from_pretrained(directory)
    return getattr(diffusers, class_name).load_config(directory)


def build_meta_component(library: str, class_name: str, directory: Path) -> nn.Module:
    """The component with every parameter on the meta device (no memory), eval mode."""
    config = component_config(library, class_name, directory)
    with accelerate.init_empty_weights(include_buffers=False):
        if library == "transformers":
            model = getattr(transformers, class_name)._from_config(config)
        else:
            model = getattr(diffusers, class_name).from_config(config)
    return model.eval().requires_grad_(False)


def unsharded_models(model_path: Path, sharded: set[str]) -> dict[str, tuple[str, str]]:
    """Name -> (library, class) of every model of the pipeline not in `sharded` (the VAE, encoders
    without a plan); tokenizers, processors and schedulers are not models."""
    index = json.loads((model_path / "model_index.json").read_text())
    return {
        name: (entry[0], entry[1]) for name, entry in index.items()
        if name not in sharded and isinstance(entry, list) and _holds_parameters(entry[0], entry[1])
    }


def load_whole_model(
    library: str, class_name: str, directory: Path, device: torch.device, dtype: torch.dtype, dummy: bool = False
) -> nn.Module:
    """A model the rank holds whole (the VAE, a text encoder without a TP plan), read by its own
    library's loader, or random (dummy)."""
    if dummy:
        model = build_meta_component(library, class_name, directory)
        initialize_randomly(model, device, dtype)
        _cast_buffers(model, dtype)
        return model
    model_class = getattr(transformers if library == "transformers" else diffusers, class_name)
    model = model_class.from_pretrained(directory, **{"dtype" if library == "transformers" else "torch_dtype": dtype})
    return model.to(device).eval().requires_grad_(False)


def _holds_parameters(library: str, class_name: str) -> bool:
    if library == "transformers":
        return issubclass(getattr(transformers, class_name, object), transformers.PreTrainedModel)
    return library == "diffusers" and issubclass(getattr(diffusers, class_name, object), diffusers.ModelMixin)


def load_component_shard(
    component: ShardedComponent, directory: Path, rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
    dummy: bool = False, quantization: Quantization | None = None, gguf_file: str | None = None,
    group_name: str = "tp",
) -> nn.Module:
    """This rank's shard over `world_size` ranks (the TP group or its `group_name` sub-group), read
    from the checkpoint, or random (dummy: no weights needed)."""
    model = build_meta_component(component.library, component.class_name, directory)
    checkpoint = None if dummy else open_checkpoint(model, directory, component, quantization, gguf_file)
    try:
        for line in shard_on_meta(model, component, rank, world_size, dtype, quantization, checkpoint, group_name):
            if rank == 0:
                logger.warning("%s: %s", component.name, line)
        if dummy:
            initialize_randomly(model, device, dtype)
        else:
            _load_parameters(model, checkpoint, device, dtype)
    finally:
        if checkpoint is not None:
            checkpoint.close()
    _cast_buffers(model, dtype)
    return model.to(device=device)


def shard_on_meta(model: nn.Module, component: ShardedComponent, rank: int, world_size: int, dtype: torch.dtype,
                  quantization: Quantization | None, checkpoint=None, group_name: str = "tp") -> list[str]:
    """Split `model` (on meta) for this rank and quantize its layers as asked; the splits moved to
    quantization-block boundaries, described (see tensor_parallel.apply_plan)."""
    formats = {}
    if quantization is not None and quantization.applies_to(component.name):
        formats = weight_formats(model, quantization, checkpoint)
    moved = []
    if world_size > 1:
        blocks = {name: (form.block, form.gguf_type.name) for name, form in formats.items() if form.block > 1}
        moved = apply_plan(model, component.plan, rank, world_size, blocks, group_name)
    quantize_layers(model, formats, parameter_dtype(model, "", dtype))
    return moved


def open_checkpoint(model: nn.Module, directory: Path, component: ShardedComponent,
                    quantization: Quantization | None, gguf_file: str | None = None):
    """Where the component's tensors are read from: a GGUF file (the DiT under --quantization gguf)
    or its safetensors files."""
    expected = {name for name, _ in model.named_parameters()}
    if quantization is not None and quantization.method == "gguf" and quantization.applies_to(component.name):
        path = find_gguf(directory, gguf_file)
        if path is None:
            raise FileNotFoundError(f"--quantization gguf: no .gguf file in {directory}; "
                                    "name one with --transformer-file")
        return GgufCheckpoint(path, expected, type(model).__name__)
    return SafetensorsCheckpoint(_tensor_locations(model, directory), expected, type(model).__name__)


class SafetensorsCheckpoint(RowCheckpoint):
    """Model tensor name -> its slice from the safetensors files; headers answer dtype and size. A
    DiT file without the model's names (`expected`) is read in its original layout (ComfyUI's FP8
    files) through diffusers' converter for `class_name`."""

    _DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
               "I8": torch.int8, "U8": torch.uint8, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}

    def __init__(self, locations: dict[str, tuple[Path, str]], expected: set[str] = frozenset(),
                 class_name: str = ""):
        self.locations = locations
        self._files = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._set_layout(expected, class_name)

    def _handle(self, stored: str):
        path, key = self.locations[stored]
        if path not in self._handles:
            self._handles[path] = self._files.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self._handles[path], key

    def _view(self, stored: str):
        handle, key = self._handle(stored)
        return handle.get_slice(key)

    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        return {stored: tuple(self._view(stored).get_shape()) for stored in self.locations}

    def dtype(self, name: str) -> torch.dtype | None:
        return self._DTYPES.get(self._view(self.stored_name(name)).get_dtype()) if name in self else None

    def read(self, name: str, slices: ShardSlices | None) -> torch.Tensor:
        return self.read_rows(name, slices)

    def _read_stored(self, stored: str, start: int, end: int, columns: ShardSlices | None) -> torch.Tensor:
        shape = self._shapes[stored]
        if shape == () or (columns is None and (start, end) == (0, shape[0])):  # whole: from the map, no copy
            handle, key = self._handle(stored)
            return handle.get_tensor(key)
        view = self._view(stored)
        index = [slice(start, end)] + [slice(None)] * (len(self._shapes[stored]) - 1)
        if columns is None:
            return view[tuple(index)]
        parts = []
        for a, b in columns.ranges:
            index[columns.dim] = slice(a, b)
            parts.append(view[tuple(index)])
        return torch.cat(parts, dim=columns.dim)

    def order(self, name: str) -> tuple:
        return tuple(map(str, self.locations[self.stored_name(name)]))

    def close(self) -> None:
        self._files.close()


def initialize_randomly(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Materialise every meta parameter on `device`: N(0, 0.02) matrices, unit norm weights, zero biases.

    Each tensor is seeded by its name, so parameters held whole are equal on every rank.
    """
    for name, parameter in model.named_parameters():
        tensor = torch.empty(parameter.shape, dtype=parameter_dtype(model, name, dtype), device=device)
        if parameter.dim() > 1:
            generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
            tensor.normal_(0.0, 0.02, generator=generator)
        else:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        _assign(model, name, tensor, parameter)
    for name, weight in quantized_weights(model).items():
        fill_randomly(weight, torch.Generator(device=device).manual_seed(zlib.crc32(name.encode())), device)


def parameter_dtype(model: nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """float32 for the modules the model class says must stay in float32, else `dtype`."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return torch.float32 if any(part in keep for part in name.split(".")) else dtype


def _cast_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    for name, buffer in model.named_buffers():
        owner, attribute = owner_of(model, name)
        if buffer.is_floating_point() and not isinstance(owner, QuantizedWeight):
            owner._buffers[attribute] = buffer.to(parameter_dtype(model, name, dtype))


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    indexes = list(directory.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    files = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    return files


def _tensor_locations(model: nn.Module, directory: Path) -> dict[str, tuple[Path, str]]:
    """Model tensor name -> (file, checkpoint key) for every tensor the checkpoint holds."""
    files = _tensor_files(directory)
    if not isinstance(model, transformers.PreTrainedModel):
        return {key: (path, key) for key, path in files.items()}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    expected = dict(model.state_dict())
    locations = {}
    for key, path in files.items():
        name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if converter is not None:
            raise ValueError(f"{directory}: {key} needs transformers' tensor conversion, which sharded loading lacks")
        locations[name] = (path, key)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):  # a tied tensor absent from the checkpoint is read from its source
        for target, source in tied.items():
            if target not in locations and source in locations:
                locations[target] = locations[source]
    return locations


def _load_parameters(model: nn.Module, checkpoint, device: torch.device, dtype: torch.dtype) -> None:
    quantized = quantized_weights(model)
    wanted = dict(model.named_parameters())
    wanted.update((n, b) for n, b in model.named_buffers()
                  if n in checkpoint and not isinstance(owner_of(model, n)[0], QuantizedWeight))
    missing = sorted(name for name in [*wanted, *quantized] if name not in checkpoint)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) {type(model).__name__} needs, e.g. {missing[:3]}")
    reads = {name: functools.partial(_read_plain, checkpoint, name, shard_slices(tensor))
             for name, tensor in wanted.items()}
    reads.update((name, functools.partial(read_quantized, name, weight, checkpoint))
                 for name, weight in quantized.items())
    names = sorted(reads, key=checkpoint.order)  # file by file, in checkpoint order
    current = {**wanted, **{name: buffer for name, buffer in model.named_buffers() if name not in wanted}}
    for tensors in _read_ahead([reads[name] for name in names], pin=device.type == "cuda"):
        for name, host_tensor in tensors.items():
            # Copy as read (asynchronously from pinned memory on a GPU) and cast on the device, which
            # casts bf16 -> target dtype faster than the CPU; the reader thread meanwhile reads ahead.
            tensor = host_tensor.to(device, non_blocking=True)
            if name in wanted and tensor.is_floating_point():
                tensor = tensor.to(parameter_dtype(model, name, dtype))
            _assign(model, name, tensor, current[name])
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_plain(checkpoint, name: str, slices: ShardSlices | None) -> dict[str, torch.Tensor]:
    tensor = checkpoint.read(name, slices)
    if tensor.dtype == torch.float8_e4m3fn:  # cast without its scale it would be wrong by that factor
        raise ValueError(f"{name} is stored in float8: serve the model with --quantization fp8")
    return {name: tensor}


def _read_ahead(reads: list[Callable[[], dict[str, torch.Tensor]]], pin: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Each read's tensors, in order, made by one thread up to _READ_AHEAD reads ahead of the
    consumer, so disk reads (and quantizing at load) overlap the host-to-device copies and casts."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-reader") as reader:

        def run(read) -> dict[str, torch.Tensor]:
            tensors = read()
            return {name: tensor.pin_memory() for name, tensor in tensors.items()} if pin else tensors

        pending = deque(reader.submit(run, read) for read in reads[:_READ_AHEAD])
        for read in reads[_READ_AHEAD:]:
            yield pending.popleft().result()
            pending.append(reader.submit(run, read))
        while pending:
            yield pending.popleft().result()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, current: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(current.shape):
        raise ValueError(
            f"{name}: checkpoint slice has shape {tuple(tensor.shape)}, model expects {tuple(current.shape)}")
    owner, attribute = owner_of(model, name)
    if attribute in owner._parameters:
        replacement = nn.Parameter(tensor, requires_grad=False)
        set_shard_slices(replacement, shard_slices(current))
        owner._parameters[attribute] = replacement
    else:
        owner._buffers[attribute] = tensor
