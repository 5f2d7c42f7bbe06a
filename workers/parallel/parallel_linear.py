"""Megatron-style tensor-parallel Linear and Embedding layers that hold only this rank's slice of the weight.

Each sharded parameter records which ranges of which dimension of the full checkpoint tensor it
holds (`shard_slices`), so the loader reads exactly that slice from the safetensors file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.parallel import parallel_state
from workers.shard_slices import Ranges, ShardSlices, set_shard_slices, shard_slices


def _parameter(shape: tuple[int, ...], slices: ShardSlices | None, **factory) -> nn.Parameter:
    parameter = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
    set_shard_slices(parameter, slices)
    return parameter


def _matmul(weight, x: torch.Tensor, bias: torch.Tensor | None, reduce_amax=None) -> torch.Tensor:
    """x @ W.T + bias for a plain weight or a quantized one (workers.quantization.weights)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight.linear(x, bias, reduce_amax)


def _describe(ranges: Ranges) -> str:
    return "+".join(f"[{start}:{end}]" for start, end in ranges)


def gather_columns(local: torch.Tensor, ranges: Ranges, width: int, group_name: str = "tp") -> torch.Tensor:
    """The full-width output from every rank's columns: each writes its own into zeros, one
    all-reduce sums them (exact: the other ranks add zeros)."""
    full = local.new_zeros(*local.shape[:-1], width)
    offset = 0
    for start, end in ranges:
        full[..., start:end] = local[..., offset : offset + end - start]
        offset += end - start
    return parallel_state.all_reduce(full, group_name)


def _gathered_if_asked(layer: nn.Module, local: torch.Tensor) -> torch.Tensor:
    if layer.gather_output_width is None:
        return local
    return gather_columns(local, shard_slices(layer.weight).ranges, layer.gather_output_width, layer.group_name)


def _communication(gather_output_width: int | None) -> str:
    if gather_output_width is None:
        return "no all-reduce"
    return f"output gathered to {gather_output_width} by all-reduce"


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[out_ranges].T: output features split across ranks, no communication.

    With `gather_output_width` (for small outputs a whole-width op reads next, like adaLN
    modulation) every rank gets the full y.
    """

    group_name = "tp"  # the TP group, or a sub-group of it (parallel_state.sub_group_name)

    def __init__(self, in_features: int, out_ranges: Ranges, bias: bool, gather_output_width: int | None = None,
                 **factory):
        super().__init__()
        slices = ShardSlices(0, out_ranges)
        self.in_features, self.out_features = in_features, slices.width
        self.gather_output_width = gather_output_width
        self.weight = _parameter((self.out_features, in_features), slices, **factory)
        self.bias = _parameter((self.out_features,), slices, **factory) if bias else None
        self.adapters = None  # a workers.lora.layers.AdapterSlot once a LoRA adapter touches this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = _matmul(self.weight, x, self.bias)
        if self.adapters is not None:
            local = self.adapters(x, local)
        return _gathered_if_asked(self, local)

    def extra_repr(self) -> str:
        ranges = _describe(shard_slices(self.weight).ranges)
        communication = _communication(self.gather_output_width)
        return f"in_features={self.in_features}, out_features={ranges}, bias={self.bias is not None}, {communication}"


class ParallelEmbedding(nn.Module):
    """An embedding table split on its embedding dim: each rank looks up its columns of every row.

    Splitting columns rather than the vocabulary keeps the lookup local; with `gather_output_width`
    the full-width embeddings are gathered (a few hundred tokens wide: cheap).
    """

    group_name = "tp"  # the TP group, or a sub-group of it (parallel_state.sub_group_name)

    def __init__(self, num_embeddings: int, dim_ranges: Ranges, padding_idx: int | None,
                 gather_output_width: int | None = None, **factory):
        super().__init__()
        slices = ShardSlices(1, dim_ranges)
        self.num_embeddings, self.embedding_dim = num_embeddings, slices.width
        self.padding_idx, self.gather_output_width = padding_idx, gather_output_width
        self.weight = _parameter((num_embeddings, self.embedding_dim), slices, **factory)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = F.embedding(ids, self.weight, self.padding_idx)
        return _gathered_if_asked(self, local)

    def extra_repr(self) -> str:
        ranges = _describe(shard_slices(self.weight).ranges)
        return f"{self.num_embeddings}, embedding_dim={ranges}, {_communication(self.gather_output_width)}"


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local @ W[:, in_ranges].T, then the bias once: one all-reduce."""

    group_name = "tp"  # the TP group, or a sub-group of it (parallel_state.sub_group_name)

    def __init__(self, in_ranges: Ranges, out_features: int, bias: bool, **factory):
        super().__init__()
        slices = ShardSlices(1, in_ranges)
        self.in_features, self.out_features = slices.width, out_features
        self.weight = _parameter((out_features, self.in_features), slices, **factory)
        self.bias = _parameter((out_features,), None, **factory) if bias else None
        self.adapters = None  # a workers.lora.layers.AdapterSlot once a LoRA adapter touches this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = _matmul(self.weight, x, None, self._max_over_ranks)
        if self.adapters is not None:  # this rank's share of B A x joins the same all-reduce
            partial = self.adapters(x, partial)
        y = parallel_state.all_reduce(partial, self.group_name)
        return y if self.bias is None else y + self.bias

    def _max_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return parallel_state.all_reduce_max(tensor, self.group_name)

    def extra_repr(self) -> str:
        ranges = _describe(shard_slices(self.weight).ranges)
        return f"in_features={ranges}, out_features={self.out_features}, bias={self.bias is not None}, all-reduce"
