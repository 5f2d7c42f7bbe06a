"""Which linear layers of a component are quantized and how, their replacement on the meta device,
and reading (or making) their quantized tensors at load.

The decision is taken from the unsharded model and the checkpoint's headers only, so every rank,
the memory report and the engine's split check decide alike:
- fp8 / int8 (`Quantization.method`): every nn.Linear of a component the family lists, except its
  `keep` patterns. A float8 checkpoint tensor is read as stored, with its `weight_scale` (or
  ComfyUI's `scale_weight`), per-tensor or per-output-channel; a float one is quantized at load with
  per-output-channel scales taken over whole rows, so a rank holding some columns rounds as TP=1 does.
- gguf: each weight in the type the file stores it in (F32/F16/BF16 tensors load as plain ones).
- dummy loads (no checkpoint): fp8/int8 per channel; gguf in `gguf_type`, or Q8_0 / plain for a
  layer whose rows are not whole blocks of it (as GGUF converters fall back).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType
from torch import nn

from configs import QuantizationPlan
from workers.module_tree import owner_of
from workers.quantization import gguf_blocks
from workers.quantization.weights import METHODS, QuantizedLinear, QuantizedWeight, quantize
from workers.shard_slices import shard_slices


@dataclass(frozen=True)
class Quantization:
    """What was asked: `method` (fp8, int8, gguf), the GGUF type a dummy load or the memory report
    uses, and the family's plan (components, keep patterns)."""

    method: str
    components: tuple[str, ...] = ("transformer",)
    keep: tuple[str, ...] = ()
    gguf_type: str = "Q8_0"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization={self.method!r} is not one of {', '.join(METHODS)}")
        kind = getattr(GGMLQuantizationType, self.gguf_type.upper(), None)
        if kind not in (*gguf_blocks.SUPPORTED, *gguf_blocks.PLAIN):
            names = ", ".join(k.name for k in gguf_blocks.SUPPORTED)
            raise ValueError(f"GGUF type {self.gguf_type!r} is not supported; supported: {names}")

    @classmethod
    def parse(cls, text: str | None, plan: QuantizationPlan = QuantizationPlan()) -> Quantization | None:
        """"fp8", "int8", "gguf" or "gguf:Q4_K" (the type a dummy load uses) under a family's plan;
        None for None. A GGUF file holds the DiT only."""
        if not text:
            return None
        method, _, kind = text.partition(":")
        components = ("transformer",) if method.lower() == "gguf" else tuple(plan.components)
        return cls(method.lower(), components, tuple(plan.keep), kind or "Q8_0")

    def applies_to(self, component: str) -> bool:
        return component in self.components


@dataclass(frozen=True)
class WeightFormat:
    method: str
    per_channel: bool = True
    gguf_type: GGMLQuantizationType | None = None

    @property
    def block(self) -> int:
        """Columns that must stay on one rank together (a GGUF block), 1 otherwise."""
        return gguf_blocks.block_format(self.gguf_type).elements if self.method == "gguf" else 1


def weight_formats(model: nn.Module, quantization: Quantization, checkpoint=None) -> dict[str, WeightFormat]:
    """Layer name -> its format, for every linear layer that is quantized. `checkpoint`: where the
    tensors are read from (it says how they are stored); None for a dummy load."""
    formats = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        key = f"{name}.weight"
        if quantization.method == "gguf":
            kind = checkpoint.gguf_type(key) if checkpoint is not None else gguf_blocks.type_for_rows(
                module.in_features, GGMLQuantizationType[quantization.gguf_type.upper()])
            if kind is not None and kind not in gguf_blocks.PLAIN:
                if kind not in gguf_blocks.SUPPORTED:
                    raise ValueError(f"{key} is stored as {kind.name}; supported GGUF types: "
                                     f"{', '.join(k.name for k in gguf_blocks.SUPPORTED)}")
                formats[name] = WeightFormat("gguf", gguf_type=kind)
            continue
        stored_fp8 = checkpoint is not None and checkpoint.dtype(key) == torch.float8_e4m3fn
        if stored_fp8 and quantization.method != "fp8":
            raise ValueError(f"{key} is stored in float8: serve it with --quantization fp8")
        if not stored_fp8 and any(fnmatch.fnmatchcase(name, pattern) for pattern in quantization.keep):
            continue  # kept in the compute dtype (a layer stored in float8 stays float8, with its scale)
        scale = checkpoint.scale_of(key) if stored_fp8 else None
        per_channel = not stored_fp8 or (scale is not None and scale[1])
        formats[name] = WeightFormat(quantization.method, per_channel=per_channel)
    return formats


def quantize_layers(model: nn.Module, formats: dict[str, WeightFormat], dtype: torch.dtype) -> None:
    """Give every layer in `formats` a QuantizedWeight (on the meta device) in place of its weight;
    plain nn.Linear layers become QuantizedLinear, the TP layers keep their class."""
    for name, form in formats.items():
        layer = model.get_submodule(name)
        weight = QuantizedWeight(form.method, tuple(layer.weight.shape), dtype, shard_slices(layer.weight),
                                 form.per_channel, form.gguf_type)
        if type(layer) is nn.Linear:
            quantized = QuantizedLinear(weight, layer.bias)
            setattr(*owner_of(model, name), quantized)
        else:
            del layer._parameters["weight"]
            layer.weight = weight


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Checkpoint weight name ("blocks.0.ff.w1.weight") -> its QuantizedWeight."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedWeight)}


def read_quantized(name: str, weight: QuantizedWeight, checkpoint) -> dict[str, torch.Tensor]:
    """This rank's stored tensors of weight `name` ("<layer>.weight"), keyed by their model names."""
    slices = shard_slices(weight)
    if weight.method == "gguf":
        return {f"{name}.values": checkpoint.read_blocks(name, shard_slices(weight.values))}
    tensors = {}
    if checkpoint.dtype(name) == torch.float8_e4m3fn:
        tensors["values"] = checkpoint.read(name, slices)
        has_scale = checkpoint.scale_of(name) is not None
        tensors["scale"] = checkpoint.read_scale(name, shard_slices(weight.scale)) if has_scale else torch.ones(())
    else:
        rows = slices if slices is not None and slices.dim == 0 else None
        values, scale = quantize(checkpoint.read(name, rows), weight.method)
        if slices is not None and slices.dim == 1:
            values = torch.cat([values[:, start:end] for start, end in slices.ranges], dim=1)
        tensors = {"values": values, "scale": scale}
    return {f"{name}.{part}": tensor for part, tensor in tensors.items()}


def fill_randomly(weight: QuantizedWeight, generator: torch.Generator, device: torch.device) -> None:
    """Dummy weights with the spread of N(0, 0.02), in the weight's own format (valid blocks and
    scales, unlike random bytes): fp8/int8 drawn as integers, uniform in +-127 steps of a scale that
    gives that spread, without a float copy of the layer."""
    if weight.method == "gguf":
        dense = torch.empty(weight.shape, device=device).normal_(0.0, 0.02, generator=generator)
        weight.values = gguf_blocks.quantize(dense, weight.gguf_type)
        return
    steps = torch.randint(-127, 128, weight.shape, generator=generator, device=device, dtype=torch.int8)
    weight.values = steps.to(weight.values.dtype)
    weight.scale = torch.full(weight.scale.shape, 0.02 * 3**0.5 / 127, device=device)

