"""The peak memory of a VAE decode at a given size, measured on the meta device: the full-size VAE
built from its configuration decodes meta latents while a dispatch mode adds up the bytes of the
tensors alive after each op. No weights, no activation memory, seconds of CPU.

Counted: every op output that is not a view of, or the same tensor as, an input, until Python drops
it. Attention counts its output only, as a fused kernel (flash, memory-efficient) holds no score
matrix; the meta device's own attention would. Kernel workspaces and the allocator's rounding are
not counted, so on a GPU the peak is a few percent higher.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from workers.parallel.sharded_loading import build_meta_component


class _LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs and not tensor._is_view():
                nbytes = tensor.numel() * tensor.element_size()
                self.live += nbytes
                weakref.finalize(tensor, self._release, nbytes)
        self.peak = max(self.peak, self.live)
        return out


class _FusedAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, value = args[0], args[2] if len(args) > 2 else kwargs["value"]
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return func(*args, **kwargs)


def decode_peak_bytes(vae_directory: Path, class_name: str, width: int, height: int, dtype: torch.dtype,
                      tiling: bool = False, slicing: bool = False, batch: int = 1) -> int:
    """Peak bytes of activations while `batch` images of width x height decode (the weights not counted)."""
    vae = nn.Module.to(build_meta_component("diffusers", class_name, vae_directory), dtype)  # diffusers would warn
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    factor = 2 ** (len(vae.config.get("temperal_downsample", vae.config.get("block_out_channels", [0] * 4)[1:])))
    channels = vae.config.get("latent_channels", vae.config.get("z_dim"))
    shape = [batch, channels, height // factor, width // factor]
    if "temperal_downsample" in vae.config:  # Qwen-Image's video VAE decodes one frame
        shape.insert(2, 1)
    latents = torch.empty(shape, device="meta", dtype=dtype)
    with torch.no_grad(), _FusedAttention(), _LiveBytes() as counter:
        vae.decode(latents)
    return counter.peak
