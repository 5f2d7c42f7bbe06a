"""Per-rank parameter memory of a model under a rank layout, and its table.

Only config files are read, so it works for full-size models whose weights are not present (the
published ones resolve to the configurations in configs/published.yaml); workers.planning builds
and shards every component on the meta device exactly as the ranks do, so the report is what loads.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from engine.models.resolver import ResolvedModel
from workers import RankLayout
from workers.planning import RankMemory, ShardedComponent, rank_memory, vae_decode_peaks


def memory_report(
    model: ResolvedModel, layout: RankLayout | int, dtype: torch.dtype, ranks: Iterable[int] | None = None,
    components: list[ShardedComponent] | None = None, quantization: str | None = None,
) -> list[RankMemory]:
    """Bytes per rank as loading `model` under `layout` (or at a tensor-parallel size) holds them,
    with its weights quantized as `quantization` (fp8, int8, gguf:<type>) asks."""
    layout = RankLayout(tensor_parallel_size=layout) if isinstance(layout, int) else layout
    return rank_memory(model.family, model.path, layout, dtype, ranks, components, quantization)


def format_decode_peaks(model: ResolvedModel, size: tuple[int, int], dtype: torch.dtype) -> str:
    """One line: the VAE decode's activation peak at `size` (W, H), whole and with --vae-use-tiling."""
    peaks = vae_decode_peaks(model.path, *size, dtype)
    return (f"VAE decode of one {size[0]}x{size[1]} image (activations, rank 0): {format_size(peaks['whole'])}, "
            f"with --vae-use-tiling {format_size(peaks['tiled'])}")


def format_size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.2f} MiB"


def format_report(model: ResolvedModel, layout: RankLayout | int, dtype_name: str, ranks: list[RankMemory],
                  quantization: str | None = None) -> str:
    layout = RankLayout(tensor_parallel_size=layout) if isinstance(layout, int) else layout
    header = ("rank", "DiT shard", "DiT replicated", "text enc. shard", "text enc. whole", "VAE", "total")
    rows = [header] + [
        (str(r.rank), *map(format_size, (r.dit_sharded, r.dit_replicated, r.text_encoders_sharded,
                                          r.text_encoders_replicated, r.vae, r.total)))
        for r in ranks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    weights = f", {quantization} weights" if quantization else ""
    lines = [f"{model.name} ({model.family.name}), {layout.describe()}, {dtype_name} parameters{weights}"]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines += [f"note: {line}" for line in dict.fromkeys(line for r in ranks for line in r.moved_splits)]
    return "\n".join(lines)
