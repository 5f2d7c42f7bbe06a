"""LoRA adapters on a rank, each one split the way its base layer is split.

The driver reads an adapter file once (`read_adapter`, through the pipeline class's own
`lora_state_dict`, so every format diffusers converts is accepted: PEFT/diffusers, Kohya,
ComfyUI...) and broadcasts its low-rank pairs; every rank keeps only its slices (`AdapterStore.put`):

- column-parallel base (output features split): up (B) is sliced on its rows, down (A) kept whole;
- row-parallel base (input features split): down is sliced on its columns, up kept whole, and the
  rank's partial product joins the layer's own all-reduce (the sum over ranks is B A x), so an
  adapter adds no collective;
- a layer every rank holds whole (or TP=1): both whole.

Each adapted layer gets an `AdapterSlot`; the adapters a batch asks for (name, scale) are made
active in the slots and add scale x up(down(x)) to the layer's output, inside its forward. The
adapter's own alpha / rank factor is folded into up once, at read time.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs
from torch import nn

from workers.parallel.parallel_linear import ColumnParallelLinear, RowParallelLinear, shard_slices

ModuleKey = tuple[str, str]  # (pipeline component, module name inside it)
Active = tuple[tuple[str, float], ...]  # (adapter name, scale) in the order they are added
_ADAPTABLE = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


class AdapterError(ValueError):
    """An adapter that cannot be used here; `code` says why in one word for the API."""

    def __init__(self, message: str, code: str = "invalid_lora_adapter"):
        super().__init__(message)
        self.code = code


@dataclass
class LowRank:
    down: torch.Tensor  # A: rank x in_features
    up: torch.Tensor  # B: out_features x rank, alpha / rank folded in

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.down, self.up))


class AdapterSlot:
    """The adapters of one layer on this rank; the layer calls it with its input and its output
    (for a row-parallel layer: the partial output, before the all-reduce)."""

    def __init__(self) -> None:
        self.resident: dict[str, LowRank] = {}
        self.active: list[tuple[LowRank, float]] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # y is the layer's own fresh output: added to in place, the scale applied on the rank-wide
        # intermediate, so an adapter allocates nothing output-sized.
        for pair, scale in self.active:
            y.add_(F.linear(F.linear(x, pair.down).mul_(scale), pair.up))
        return y


def _linear_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    slot = module.adapters
    return slot(args[0], output) if slot.active else None


def full_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of the whole layer, whatever this rank holds of it."""
    return getattr(module, "full_shape", tuple(module.weight.shape))


class AdapterStore:
    """This rank's slices of every resident adapter, and which are active."""

    def __init__(self, components: dict[str, nn.Module], dtype: torch.dtype, device: torch.device):
        """`device`: where the layers run (an offloaded model's weights are elsewhere between uses)."""
        self.components = {name: c for name, c in components.items() if isinstance(c, nn.Module)}
        self.dtype, self.device = dtype, device
        self.slots: dict[ModuleKey, AdapterSlot] = {}
        self.resident: dict[str, dict[ModuleKey, LowRank]] = {}
        self.active: Active = ()

    def put(self, name: str, pairs: dict[ModuleKey, LowRank]) -> None:
        """Keep this rank's slices of `pairs` (whole tensors, as read); layers of components this
        rank does not hold are skipped."""
        local = {}
        for key, pair in pairs.items():
            if key[0] not in self.components:
                continue
            module = self.components[key[0]].get_submodule(key[1])
            local[key] = _local_part(module, pair, self.dtype, self.device)
            self._slot(key, module).resident[name] = local[key]
        self.resident[name] = local

    def drop(self, name: str) -> None:
        for key in self.resident.pop(name, {}):
            self.slots[key].resident.pop(name, None)
        if any(active == name for active, _ in self.active):
            self.activate(tuple((n, s) for n, s in self.active if n != name))

    def activate(self, active: Active) -> None:
        for slot in self.slots.values():
            slot.active = [(slot.resident[name], scale) for name, scale in active if name in slot.resident]
        self.active = active

    def nbytes(self, name: str) -> int:
        return sum(pair.nbytes for pair in self.resident[name].values())

    def _slot(self, key: ModuleKey, module: nn.Module) -> AdapterSlot:
        if key not in self.slots:
            self.slots[key] = module.adapters = AdapterSlot()
            if isinstance(module, nn.Linear):  # the parallel layers call their slot themselves
                module.register_forward_hook(_linear_hook)
        return self.slots[key]


def _local_part(module: nn.Module, pair: LowRank, dtype: torch.dtype, device: torch.device) -> LowRank:
    down, up = pair.down, pair.up
    slices = shard_slices(module.weight)
    if slices is not None:
        if slices.dim == 0:  # output features split: this rank's rows of up
            up = torch.cat([up[start:end] for start, end in slices.ranges])
        else:  # input features split: this rank's columns of down
            down = torch.cat([down[:, start:end] for start, end in slices.ranges], dim=1)
    return LowRank(down.to(device, dtype).contiguous(), up.to(device, dtype).contiguous())


# reading (driver) --------------------------------------------------------------------------------
def read_adapter(path: str, pipeline_class: type, components: dict[str, nn.Module],
                 max_rank: int) -> dict[ModuleKey, LowRank]:
    """Every low-rank pair of the adapter at `path` (a folder, a .safetensors file or a hub id),
    whole, in float32, matched against `components`; AdapterError says what does not fit."""
    state, alphas, metadata = _state_dict(path, pipeline_class)
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[rest] = tensor
    pairs: dict[ModuleKey, LowRank] = {}
    unmatched: list[str] = []
    for component, tensors in by_component.items():
        module_pairs = _pairs(component, tensors)
        scales = _scales(component, module_pairs, alphas, metadata)
        holder = components.get(component)
        modules = dict(holder.named_modules()) if isinstance(holder, nn.Module) else {}
        for name, (down, up) in module_pairs.items():
            module_name = _module_name(name, modules)
            if module_name is None or not _fits(modules[module_name], down, up):
                unmatched.append(f"{component}.{name}")
                continue
            rank = down.shape[0]
            if rank > max_rank:
                raise AdapterError(f"{path}: {component}.{name} has rank {rank}, above --max-lora-rank={max_rank}",
                                   "lora_rank_too_high")
            pairs[(component, module_name)] = LowRank(down.float(), up.float() * scales[name])
    if unmatched:
        raise AdapterError(
            f"{path}: {len(unmatched)} of the adapter's layers match no layer of this model (an adapter for "
            f"another model family, or of another size?), e.g. {', '.join(sorted(unmatched)[:3])}")
    if not pairs:
        raise AdapterError(f"{path}: the file holds no LoRA weights")
    return pairs


def _state_dict(path: str, pipeline_class: type) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    location, options = path, {"return_lora_metadata": True}
    if Path(path).is_file():
        location, options["weight_name"] = str(Path(path).parent), Path(path).name
    if "return_alphas" in inspect.signature(pipeline_class.lora_state_dict).parameters:
        options["return_alphas"] = True
    try:
        out = pipeline_class.lora_state_dict(location, **options)
    except Exception as exc:
        raise AdapterError(f"could not read a LoRA adapter from {path}: {type(exc).__name__}: {exc}") from None
    return out[0], (out[1] if len(out) == 3 else None), (out[-1] or {})


def _pairs(component: str, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (down, up), in PEFT naming (diffusers' converters for older namings)."""
    if not any(".lora_A." in key or ".lora_B." in key for key in tensors):
        tensors = (convert_unet_state_dict_to_peft(tensors) if component == "transformer"
                   else convert_state_dict_to_peft(convert_state_dict_to_diffusers(tensors)))
    downs, ups = {}, {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_A.weight"):
            downs[key.removesuffix(".lora_A.weight")] = tensor
        elif key.endswith(".lora_B.weight"):
            ups[key.removesuffix(".lora_B.weight")] = tensor
        else:
            what = "DoRA" if "lora_magnitude_vector" in key else "LoRA bias" if key.endswith(".bias") else "this tensor"
            raise AdapterError(f"{component}.{key}: {what} is not supported; plain LoRA (lora_A, lora_B) is")
    if downs.keys() != ups.keys():
        lone = sorted(downs.keys() ^ ups.keys())
        raise AdapterError(f"{component}: layers with only one of lora_A and lora_B, e.g. {lone[:3]}")
    return {name: (downs[name], ups[name]) for name in downs}


def _scales(component: str, pairs: dict, alphas: dict | None, metadata: dict) -> dict[str, float]:
    """alpha / rank per layer (alpha / sqrt(rank) with rsLoRA), as PEFT computes it: from the file's
    saved LoRA config when it has one, else from its alphas (Kohya), else alpha = rank."""
    config = {k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")}
    if "lora_alpha" not in config:
        ranks = {f"{name}.lora_B.weight": up.shape[1] for name, (down, up) in pairs.items()}
        own_alphas = {k: v for k, v in (alphas or {}).items() if k.split(".")[0] == component} or None
        config = get_peft_kwargs(ranks, own_alphas, {}, is_unet=component == "transformer")
    if config.get("use_dora"):
        raise AdapterError(f"{component}: DoRA adapters are not supported; plain LoRA is")
    scales = {}
    for name, (down, _) in pairs.items():
        alpha = _by_pattern(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        rank = down.shape[0]
        scales[name] = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return scales


def _by_pattern(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's per-layer override: a pattern matches a layer name or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _module_name(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The adaptable layer `name` refers to: exactly, or as the one layer whose name ends with it
    (text-encoder adapters are saved with or without transformers' outer prefixes)."""
    if isinstance(modules.get(name), _ADAPTABLE):
        return name
    found = [m for m, module in modules.items() if m.endswith("." + name) and isinstance(module, _ADAPTABLE)]
    return found[0] if len(found) == 1 else None


def _fits(module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> bool:
    out_features, in_features = full_shape(module)
    return (down.dim() == up.dim() == 2 and down.shape[0] == up.shape[1]
            and down.shape[1] == in_features and up.shape[0] == out_features)
