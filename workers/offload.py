"""Keeps a pipeline model that runs once per request (a text encoder, the VAE) off the rank's
device between uses, so the memory it held serves the DiT's activations instead.

The model lives on its home device (`cpu`, or a named one such as `cuda:1`); each call of its
forward, `encode` or `decode` (diffusers pipelines call the VAE's methods, not its forward) brings
it to the rank's device for that call and home after. Nested calls (a VAE forward calls encode
and decode) move it once. Inference never changes the weights, so going home copies nothing: the
module's tensors point at the home copies again (kept, pinned when the home is the CPU and the
rank a GPU, so the copy in is fast). The cost is one copy of the model into the device per use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from workers.module_tree import owner_of

_USED_THROUGH = ("forward", "encode", "decode")


def offload_kind(component_name: str) -> str | None:
    """Which offload setting covers a pipeline component: text_encoder, text_encoder_2... -> "text_encoder"."""
    if component_name.startswith("text_encoder"):
        return "text_encoder"
    return "vae" if component_name == "vae" else None


def home_device(component_name: str, offload: dict[str, str], device: torch.device) -> torch.device:
    """Where the component is kept between uses: its offload device, or the rank's."""
    kind = offload_kind(component_name)
    return torch.device(offload[kind]) if kind in offload else device


def offload(module: nn.Module, home: torch.device, device: torch.device) -> None:
    """Keep `module` on `home` and run it on `device`, one move in and out per outermost call."""
    module.to(home)
    if home.type == "cpu" and device.type == "cuda":
        _point_at(module, {name: tensor.pin_memory() for name, tensor in _tensors(module).items()})
    at_home = _tensors(module)
    depth = 0

    def around(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(*args, **kwargs):
            nonlocal depth
            if depth == 0:
                _move(module, device)
            depth += 1
            try:
                return method(*args, **kwargs)
            finally:
                depth -= 1
                if depth == 0:
                    _point_at(module, at_home)

        return call

    for name in _USED_THROUGH:
        if callable(getattr(type(module), name, None)):
            setattr(module, name, around(getattr(module, name)))


def _move(module: nn.Module, device: torch.device) -> None:
    # Outside inference mode: the moved weights must stay ordinary tensors, usable by any later call.
    with torch.inference_mode(False), torch.no_grad():
        module.to(device, non_blocking=True)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.data for name, tensor in (*module.named_parameters(), *module.named_buffers())}


def _point_at(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make the module's parameters and buffers these tensors again (the device copies are freed)."""
    with torch.inference_mode(False), torch.no_grad():
        for name, tensor in tensors.items():
            owner, attribute = owner_of(module, name)
            if attribute in owner._parameters:
                owner._parameters[attribute].data = tensor
            else:
                owner._buffers[attribute] = tensor
