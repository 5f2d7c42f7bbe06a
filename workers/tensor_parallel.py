"""Applies a family's tensor-parallel plan (configs/) to a transformer built on the meta device.

Matching nn.Linear modules are replaced by Column/RowParallelLinear holding this rank's slice;
attention modules get their local head count (and inner width). Heads are split as evenly as possible (30 heads
over 4 ranks: 8/8/7/7); other sharded dimensions are split evenly on their own.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from configs import LayerRule, TensorParallelPlan
from workers.parallel_linear import ColumnParallelLinear, Ranges, RowParallelLinear


def even_partition(size: int, parts: int, dimension: str) -> list[tuple[int, int]]:
    """[start, end) of each part; the first size % parts parts are one larger."""
    if not 1 <= parts <= size:
        raise ValueError(
            f"cannot split {dimension}={size} over tensor_parallel_size={parts}: every rank needs "
            f"at least one; tensor-parallel sizes that work: 1 to {size}"
        )
    base, extra = divmod(size, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + base + (part < extra)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class HeadLayout:
    heads: int
    head_dim: int

    @classmethod
    def of(cls, plan: TensorParallelPlan, config) -> "HeadLayout":
        heads = config[plan.heads_key]
        head_dim = config[plan.head_dim_key] if plan.head_dim_key else config[plan.dim_key] // heads
        return cls(heads, head_dim)


class ShardPlanner:
    """Computes this rank's ranges for every rule of the plan."""

    def __init__(self, plan: TensorParallelPlan, config, rank: int, world_size: int):
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.layout = HeadLayout.of(plan, config)
        self.head_bounds = even_partition(self.layout.heads, world_size, f"{plan.heads_key} (attention heads)")

    @property
    def local_heads(self) -> int:
        start, end = self.head_bounds[self.rank]
        return end - start

    def _heads_range(self, offset: int = 0) -> tuple[int, int]:
        start, end = self.head_bounds[self.rank]
        return offset + start * self.layout.head_dim, offset + end * self.layout.head_dim

    def _even_range(self, size: int, name: str, offset: int = 0) -> tuple[int, int]:
        start, end = even_partition(size, self.world_size, f"{name} features")[self.rank]
        return offset + start, offset + end

    def ranges(self, rule: LayerRule, name: str, linear: nn.Linear) -> Ranges:
        size = linear.out_features if rule.style.startswith("colwise") else linear.in_features
        inner = self.layout.heads * self.layout.head_dim
        if rule.split == "heads":
            if size != inner:
                raise ValueError(f"{name}: {size} features, expected heads x head_dim = {inner}")
            return [self._heads_range()]
        if rule.split == "even":
            return [self._even_range(size, name)]
        return [self._heads_range(), self._even_range(size - inner, name, offset=inner)]


def apply_plan(model: nn.Module, plan: TensorParallelPlan, rank: int, world_size: int) -> None:
    """Replace planned Linears in place and make attention head counts local."""
    planner = ShardPlanner(plan, model.config, rank, world_size)
    matched = {rule.pattern: 0 for rule in plan.layers}
    for name, module in list(model.named_modules()):
        rule = _rule_for(plan, name) if isinstance(module, nn.Linear) else None
        if rule is not None:
            matched[rule.pattern] += 1
            _replace(model, name, _sharded(module, rule, planner.ranges(rule, name, module)))
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in plan.attention):
            if module.heads != planner.layout.heads:
                raise ValueError(f"{name}: {module.heads} heads, expected {planner.layout.heads}")
            module.heads = planner.local_heads
            # Some processors derive head_dim as inner_dim // heads: keep that ratio exact.
            for attribute in ("inner_dim", "inner_kv_dim"):
                if isinstance(getattr(module, attribute, None), int):
                    setattr(module, attribute, planner.local_heads * planner.layout.head_dim)
    unused = [rule.pattern for rule in plan.layers if not matched[rule.pattern] and not rule.optional]
    if unused:
        raise ValueError(f"tensor-parallel plan patterns matched no Linear layer: {unused}")


def _rule_for(plan: TensorParallelPlan, name: str) -> LayerRule | None:
    return next((rule for rule in plan.layers if fnmatch.fnmatchcase(name, rule.pattern)), None)


def _sharded(linear: nn.Linear, rule: LayerRule, ranges: Ranges) -> nn.Module:
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    has_bias = linear.bias is not None
    if rule.style.startswith("colwise"):
        gather = linear.out_features if rule.style == "colwise_gather" else None
        return ColumnParallelLinear(linear.in_features, ranges, has_bias, gather, **factory)
    return RowParallelLinear(ranges, linear.out_features, has_bias, **factory)


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
