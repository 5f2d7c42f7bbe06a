"""A linear layer's weight kept quantized on the device: FP8 (e4m3 with per-tensor or per-output-
channel scales), int8 (per-output-channel scales) or a GGUF block format.

Weight-only everywhere: each call dequantizes to the compute dtype and runs the ordinary matmul, so
memory holds 1 byte (or a GGUF block's bits) per weight. On GPUs with FP8 tensor cores (compute
capability 8.9+) an FP8 weight instead runs `torch._scaled_mm` with the activations quantized per
row; a row-parallel layer takes each row's absolute maximum over every rank first, so every layout
rounds the activations alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from workers.quantization import gguf_blocks
from workers.shard_slices import ShardSlices, set_shard_slices

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
INT8_MAX = 127
METHODS = ("fp8", "int8", "gguf")


class QuantizedWeight(nn.Module):
    """The (out, in) weight this rank holds, stored as `values` (+ `scale`); `dtype` is the compute
    dtype, which is what modules reading `layer.weight.dtype` want to know."""

    def __init__(self, method: str, shape: tuple[int, int], dtype: torch.dtype, slices: ShardSlices | None = None,
                 per_channel: bool = True, gguf_type: GGMLQuantizationType | None = None,
                 device: torch.device | str = "meta"):
        super().__init__()
        self.method, self.shape, self.dtype, self.gguf_type = method, tuple(shape), dtype, gguf_type
        self.per_channel = per_channel
        out_features, in_features = shape
        set_shard_slices(self, slices)
        if method == "gguf":
            form = gguf_blocks.block_format(gguf_type)
            values = torch.empty(out_features, in_features // form.elements * form.nbytes, dtype=torch.uint8,
                                 device=device)
            scale = None
        else:
            values = torch.empty(shape, dtype=FP8 if method == "fp8" else torch.int8, device=device)
            scale = torch.empty((out_features,) if per_channel else (), dtype=torch.float32, device=device)
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)
        set_shard_slices(self.values, storage_slices(slices, method, gguf_type))
        if scale is not None:
            set_shard_slices(self.scale, slices if per_channel and slices is not None and slices.dim == 0 else None)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.method == "gguf":
            return gguf_blocks.dequantize(self.values, self.gguf_type, dtype)
        scale = self.scale[:, None] if self.per_channel else self.scale
        return (self.values.to(torch.float32) * scale).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None,
               reduce_amax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x @ W.T + bias. `reduce_amax`: the row-parallel layer's max over ranks (scaled FP8 only)."""
        if self.method == "fp8" and _scaled_mm_works(x, self.shape):
            return _scaled_fp8_linear(x, self, bias, reduce_amax)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        scale = "per-channel" if self.per_channel else "per-tensor"
        form = self.gguf_type.name if self.method == "gguf" else f"{self.method}, {scale} scale"
        return f"{self.shape[0]}x{self.shape[1]}, {form}"


def storage_slices(slices: ShardSlices | None, method: str,
                   gguf_type: GGMLQuantizationType | None) -> ShardSlices | None:
    """The stored tensor's part for a weight's `slices`: the same rows; for GGUF, columns in bytes."""
    if slices is None or slices.dim == 0 or method != "gguf":
        return slices
    form = gguf_blocks.block_format(gguf_type)
    for start, end in slices.ranges:
        if start % form.elements or end % form.elements:
            raise ValueError(f"columns [{start}:{end}] cut {form.name} blocks of {form.elements}")
    return ShardSlices(1, [(start // form.elements * form.nbytes, end // form.elements * form.nbytes)
                           for start, end in slices.ranges])


def quantize(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, per-output-channel scale) of a float weight: symmetric, scale = row max / format max."""
    weight = weight.float()
    top = FP8_MAX if method == "fp8" else INT8_MAX
    scale = (weight.abs().amax(dim=1) / top).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = weight / scale[:, None]
    if method == "fp8":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    return scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def _scaled_mm_works(x: torch.Tensor, shape: tuple[int, int]) -> bool:
    """FP8 tensor cores and 16-aligned sides (cuBLASLt's rule)."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and shape[0] % 16 == 0 and shape[1] % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16))


def _scaled_fp8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                       reduce_amax: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    amax = rows.abs().amax(dim=1, keepdim=True).float()
    if reduce_amax is not None:
        amax = reduce_amax(amax)
    x_scale = amax.clamp_min(1e-12) / FP8_MAX
    x_fp8 = (rows / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    w_scale = weight.scale.reshape(1, -1) if weight.per_channel else weight.scale.expand(1, weight.shape[0])
    out = torch._scaled_mm(x_fp8, weight.values.t(), scale_a=x_scale, scale_b=w_scale.contiguous(),
                           bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class QuantizedLinear(nn.Linear):
    """nn.Linear over a QuantizedWeight (a layer no TP plan splits, or any at TP=1). Still an
    nn.Linear, so LoRA adapters hook it as they hook any."""

    def __init__(self, weight: QuantizedWeight, bias: nn.Parameter | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.full_shape = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)

