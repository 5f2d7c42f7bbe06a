"""Megatron-style tensor-parallel Linear layers that hold only this rank's slice of the weight.

Each parameter records which ranges of which dimension of the full checkpoint tensor it holds
(`tp_slices`), so the loader can read exactly that slice from the safetensors file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import parallel_state

Ranges = list[tuple[int, int]]


def _parameter(shape: tuple[int, ...], dim: int | None, ranges: Ranges | None, **factory) -> nn.Parameter:
    parameter = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
    parameter.tp_slices = None if dim is None else (dim, ranges)
    return parameter


def _width(ranges: Ranges) -> int:
    return sum(end - start for start, end in ranges)


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[out_ranges].T: output features split across ranks, no communication."""

    def __init__(self, in_features: int, out_ranges: Ranges, bias: bool, **factory):
        super().__init__()
        self.in_features, self.out_features = in_features, _width(out_ranges)
        self.weight = _parameter((self.out_features, in_features), 0, out_ranges, **factory)
        self.bias = _parameter((self.out_features,), 0, out_ranges, **factory) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local @ W[:, in_ranges].T, then the bias once: one all-reduce."""

    def __init__(self, in_ranges: Ranges, out_features: int, bias: bool, **factory):
        super().__init__()
        self.in_features, self.out_features = _width(in_ranges), out_features
        self.weight = _parameter((out_features, self.in_features), 1, in_ranges, **factory)
        self.bias = _parameter((out_features,), None, None, **factory) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = parallel_state.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
