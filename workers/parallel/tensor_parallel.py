"""Applies a tensor-parallel plan (configs/) to a model built on the meta device: a DiT or a text encoder.

Matching nn.Linear / nn.Embedding modules are replaced by parallel layers holding this rank's
slice; attention modules get their local head counts. Heads are split as evenly as possible (30
heads over 4 ranks: 8/8/7/7). With grouped-query attention the KV heads are split and each rank
takes the query heads of its KV heads; with fewer KV heads than ranks, ranks sharing a KV head each
hold a copy of it and split its query heads. Other dimensions are split evenly on their own.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from configs import BufferRule, LayerRule, TensorParallelPlan
from configs.families import HeadLayout
from workers.module_tree import owner_of
from workers.parallel.parallel_linear import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, gather_columns
from workers.shard_slices import Ranges, ShardSlices, set_shard_slices


def even_partition(size: int, parts: int, dimension: str, unit: int = 1, why: str = "") -> list[tuple[int, int]]:
    """[start, end) of each part; the first parts are one larger. With `unit`, boundaries fall on
    multiples of it (a quantization block: `why` names it), the last unit may be short."""
    units = -(-size // unit)
    if not 1 <= parts <= units:
        each = f"at least {unit}, as {why} stay whole" if unit > 1 else "at least one"
        raise ValueError(
            f"cannot split {dimension}={size} over tensor_parallel_size={parts}: every rank needs "
            f"{each}; tensor-parallel sizes that work: 1 to {units}"
        )
    base, extra = divmod(units, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + base + (part < extra)
        bounds.append((start * unit, min(end * unit, size)))
        start = end
    return bounds


def config_value(config, dotted_key: str):
    """config["a"]["b"] or config.a.b for "a.b" (diffusers configs are dicts, transformers' objects)."""
    value = config
    for key in dotted_key.split("."):
        value = value[key] if isinstance(value, Mapping) else getattr(value, key)
    return value


def layout_dims(config, layout: HeadLayout) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of an attention layout, read from the model's config."""
    heads = config_value(config, layout.heads)
    kv_heads = config_value(config, layout.kv_heads) if layout.kv_heads else heads
    head_dim = config_value(config, layout.head_dim) if layout.head_dim else config_value(config, layout.width) // heads
    return heads, kv_heads, head_dim


@dataclass(frozen=True)
class HeadShare:
    """This rank's query heads and KV heads, as [start, end) head indices."""

    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    head_dim: int

    @property
    def local_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def head_shares(heads: int, kv_heads: int, head_dim: int, world_size: int, name: str,
                unit: int = 1, why: str = "") -> list[HeadShare]:
    """Every rank's share of an attention layout (see the module docstring); `unit`: heads that
    stay on one rank together (their columns share quantization blocks, `why`)."""
    if heads % kv_heads:
        raise ValueError(f"{name}: {heads} query heads are not a multiple of {kv_heads} KV heads")
    group = heads // kv_heads
    if unit > 1 and kv_heads != heads:
        raise ValueError(f"{name}: quantization blocks ({why}) across heads of grouped-query attention cannot split")
    if kv_heads >= world_size or kv_heads == heads:
        what = f"{name} (attention heads)" if group == 1 else f"{name} (KV heads)"
        bounds = even_partition(kv_heads, world_size, what, unit, why)
        return [HeadShare((a * group, b * group), (a, b), head_dim) for a, b in bounds]
    ranks_per_kv_head = world_size // kv_heads
    if world_size % kv_heads or ranks_per_kv_head > group:
        works = sorted({*range(1, kv_heads + 1), *(kv_heads * m for m in range(1, group + 1))})
        raise ValueError(
            f"cannot split {name}: {heads} query heads over {kv_heads} KV heads at tensor_parallel_size="
            f"{world_size}; tensor-parallel sizes that work: {', '.join(map(str, works))}"
        )
    shares = []
    for rank in range(world_size):
        kv, part = divmod(rank, ranks_per_kv_head)
        start, end = even_partition(group, ranks_per_kv_head, f"{name} (query heads per KV head)")[part]
        shares.append(HeadShare((kv * group + start, kv * group + end), (kv, kv + 1), head_dim))
    return shares


@dataclass(frozen=True)
class Block:
    """Columns a quantized row-parallel layer keeps together on one rank."""

    elements: int
    why: str  # e.g. "transformer_blocks.0.ff.net.2's Q4_K blocks of 256 columns"


class ShardPlanner:
    """Computes this rank's ranges for every rule of a plan. `layout_blocks` / `even_blocks`: the
    quantization blocks a head layout / an evenly split width must keep whole; `moved` lists the
    splits that blocks made uneven."""

    def __init__(self, plan: TensorParallelPlan, config, rank: int, world_size: int,
                 layout_blocks: dict[str, Block] | None = None, even_blocks: dict[int, Block] | None = None):
        self.rank, self.world_size = rank, world_size
        self.even_blocks = even_blocks or {}
        self.shares: dict[str, HeadShare] = {}
        self.heads_width: dict[str, int] = {}  # all ranks' query heads x head_dim, per layout
        self.moved: list[str] = []
        for name, layout in plan.layouts.items():
            heads, kv_heads, head_dim = layout_dims(config, layout)
            block = (layout_blocks or {}).get(name)
            unit = math.lcm(head_dim, block.elements) // head_dim if block else 1
            shares = head_shares(heads, kv_heads, head_dim, world_size, layout.heads, unit, block and block.why)
            if unit > 1:
                self._note_moved(f"{layout.heads}={heads} heads", [s.heads for s in shares],
                                 even_partition(heads, world_size, layout.heads), block)
            self.shares[name] = shares[rank]
            self.heads_width[name] = heads * head_dim

    def _note_moved(self, what: str, bounds: list, even: list, block: Block) -> None:
        if bounds != even:
            sizes = "/".join(str(end - start) for start, end in bounds)
            self.moved.append(f"{what} split {sizes} over the TP ranks to keep {block.why} whole")

    def local_values(self, layout: str) -> dict[str, int]:
        share = self.shares[layout]
        return {
            "heads": share.local_heads,
            "kv_heads": share.local_kv_heads,
            "groups": share.local_heads // share.local_kv_heads,
            "width": share.local_heads * share.head_dim,
            "kv_width": share.local_kv_heads * share.head_dim,
        }

    def even_range(self, size: int, name: str, offset: int = 0) -> tuple[int, int]:
        block = self.even_blocks.get(size)
        if block is None:
            bounds = even_partition(size, self.world_size, f"{name} features")
        else:
            bounds = even_partition(size, self.world_size, f"{name} features", block.elements, block.why)
            note = f"{size} features"
            if not any(note in line for line in self.moved):
                self._note_moved(note, bounds, even_partition(size, self.world_size, name), block)
        start, end = bounds[self.rank]
        return offset + start, offset + end

    def ranges(self, rule: LayerRule, name: str, size: int) -> Ranges:
        """The ranges of the split dimension (`size` wide) that this rank holds."""
        if rule.split == "even":
            return [self.even_range(size, name)]
        share = self.shares[rule.layout]
        d = share.head_dim
        heads = (share.heads[0] * d, share.heads[1] * d)
        if rule.split == "per_head":
            return [share.heads]
        if rule.split == "kv_heads":
            return [(share.kv_heads[0] * d, share.kv_heads[1] * d)]
        inner = self.heads_width[rule.layout]
        if rule.split == "qkv":  # [q; k; v], each heads x head_dim wide
            if size != 3 * inner:
                raise ValueError(f"{name}: {size} features, expected 3 x heads x head_dim = {3 * inner}")
            return [(heads[0] + i * inner, heads[1] + i * inner) for i in range(3)]
        if rule.split == "heads":
            if size != inner:
                raise ValueError(f"{name}: {size} features, expected heads x head_dim = {inner}")
            return [heads]
        return [heads, self.even_range(size - inner, name, offset=inner)]  # heads+even: [attention; the rest]


def apply_plan(model: nn.Module, plan: TensorParallelPlan, rank: int, world_size: int,
               blocks: dict[str, tuple[int, str]] | None = None, group_name: str = "tp") -> list[str]:
    """Replace planned layers in place and make attention head counts local. `blocks`: layer name ->
    (columns per quantization block, format) of quantized layers; a row-parallel one's input split
    keeps its blocks whole. `group_name`: the process group the layers reduce over. Returns the
    splits that moved for blocks (one line each)."""
    planner = ShardPlanner(plan, model.config, rank, world_size, *_block_units(model, plan, blocks or {}))
    matched = {rule.pattern: 0 for rule in plan.layers}
    replaced: dict[int, nn.Module] = {}  # a module shared under two names (tied embeddings) is replaced once
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in replaced:
            _replace(model, name, replaced[id(module)])
            continue
        rule = _rule_for(plan, name) if isinstance(module, (nn.Linear, nn.Embedding)) else None
        if rule is not None:
            matched[rule.pattern] += 1
            size = _output_width(module) if rule.style.startswith("colwise") else module.in_features
            replaced[id(module)] = _sharded(module, rule, planner.ranges(rule, name, size))
            replaced[id(module)].group_name = group_name
            replaced[id(module)].full_shape = tuple(module.weight.shape)  # what a LoRA adapter of it is shaped for
            _replace(model, name, replaced[id(module)])
            continue
        attention = next((a for a in plan.attention if fnmatch.fnmatchcase(name, a.pattern)), None)
        if attention is not None:
            local = planner.local_values(attention.layout)
            for attribute, value in attention.local.items():
                if isinstance(getattr(module, attribute, None), int):
                    setattr(module, attribute, local[value])
    for rule in plan.buffers:
        _shard_buffer(model, rule, planner, group_name)
    unused = [rule.pattern for rule in plan.layers if not matched[rule.pattern] and not rule.optional]
    if unused:
        raise ValueError(f"tensor-parallel plan patterns matched no layer of {type(model).__name__}: {unused}")
    return planner.moved


def _block_units(model: nn.Module, plan: TensorParallelPlan,
                 blocks: dict[str, tuple[int, str]]) -> tuple[dict[str, Block], dict[int, Block]]:
    """The blocks each head layout and each evenly split width must keep whole: those of the
    row-parallel layers reading them (column-parallel layers split rows, which blocks never cut)."""
    layouts: dict[str, Block] = {}
    widths: dict[int, Block] = {}
    for name, (elements, form) in blocks.items():
        rule = _rule_for(plan, name)
        if rule is None or rule.style.startswith("colwise"):
            continue
        block = Block(elements, f"{name}'s {form} blocks of {elements} columns")
        size = model.get_submodule(name).in_features
        if rule.split == "even":
            widths[size] = max(widths.get(size, block), block, key=lambda b: b.elements)
            continue
        layouts[rule.layout] = max(layouts.get(rule.layout, block), block, key=lambda b: b.elements)
        if rule.split == "heads+even":
            rest = size - _heads_width(model.config, plan, rule.layout)
            widths[rest] = max(widths.get(rest, block), block, key=lambda b: b.elements)
    return layouts, widths


def _heads_width(config, plan: TensorParallelPlan, layout_name: str) -> int:
    heads, _, head_dim = layout_dims(config, plan.layouts[layout_name])
    return heads * head_dim


def _shard_buffer(model: nn.Module, rule: BufferRule, planner: ShardPlanner, group_name: str) -> None:
    owner, attribute = owner_of(model, rule.pattern)
    table = owner._buffers[attribute]
    width = table.shape[-1]
    ranges = [planner.even_range(width, rule.pattern)]
    local = table[..., ranges[0][0] : ranges[0][1]].clone()
    set_shard_slices(local, ShardSlices(table.dim() - 1, ranges))
    owner._buffers[attribute] = local
    local_method = getattr(owner, rule.gathered)
    setattr(owner, rule.gathered,
            lambda *args, **kwargs: gather_columns(local_method(*args, **kwargs), ranges, width, group_name))


def _output_width(module: nn.Module) -> int:
    return module.embedding_dim if isinstance(module, nn.Embedding) else module.out_features


def _rule_for(plan: TensorParallelPlan, name: str) -> LayerRule | None:
    return next((rule for rule in plan.layers if fnmatch.fnmatchcase(name, rule.pattern)), None)


def _sharded(module: nn.Module, rule: LayerRule, ranges: Ranges) -> nn.Module:
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    gather = _output_width(module) if rule.style == "colwise_gather" else None
    if isinstance(module, nn.Embedding):
        if not rule.style.startswith("colwise"):
            raise ValueError(f"{rule.pattern}: an embedding can only be split colwise (on its embedding dim)")
        return ParallelEmbedding(module.num_embeddings, ranges, module.padding_idx, gather, **factory)
    has_bias = module.bias is not None
    if rule.style.startswith("colwise"):
        return ColumnParallelLinear(module.in_features, ranges, has_bias, gather, **factory)
    return RowParallelLinear(ranges, module.out_features, has_bias, **factory)


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    setattr(*owner_of(model, name), replacement)
