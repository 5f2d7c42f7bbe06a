"""Keeps a pipeline model that runs once per request (a text encoder, the VAE) off the rank's
device between uses, so the memory it held serves the DiT's activations instead.

The model lives on its home device (`cpu`, or a named one such as `cuda:1`); each call of its
forward, `encode` or `decode` (diffusers pipelines call the VAE's methods, not its forward) brings
it to the rank's device for that call and sends it home after. Nested calls (a VAE forward calls
encode and decode) move it once. The cost is one copy of the model each way per use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

OFFLOADABLE = ("text_encoder", "vae")  # what --text-encoder-offload / --vae-offload name
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
    """Keep `module` on `home` and run it on `device`, one move each way per outermost call."""
    module.to(home)
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
                    _move(module, home)

        return call

    for name in _USED_THROUGH:
        if callable(getattr(type(module), name, None)):
            setattr(module, name, around(getattr(module, name)))


def _move(module: nn.Module, device: torch.device) -> None:
    # Outside inference mode: the moved weights must stay ordinary tensors, usable by any later call.
    with torch.inference_mode(False), torch.no_grad():
        module.to(device)
