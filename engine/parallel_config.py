"""User-facing parallelism and device settings, and how they become a WorkerSpec."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import EngineOptions
from engine.host import free_port, usable_cores
from engine.models.resolver import ResolvedModel
from workers import OFFLOADABLE, RankLayout, WorkerSpec
from workers.planning import check_tensor_split, describe_split, fewest_dit_heads, text_encoder_splits

# Of a device's memory, what the parameters may take at most when `auto` chooses the TP size; the
# rest is for activations, the CUDA context and the allocator's slack.
AUTO_PARAMETER_SHARE = 0.8

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusionParallelConfig:
    """How many ranks, and what each axis does. World size = the product; TP is innermost.

    tensor_parallel_size: shards every layer (memory 1/N, an all-reduce per layer).
    ulysses_degree: splits the tokens (all-to-all around attention; the DiT is replicated).
    cfg_parallel_size: 1 or 2; the two guidance branches run at once (the DiT is replicated).
    """

    tensor_parallel_size: int = 1
    ulysses_degree: int = 1
    cfg_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "ulysses_degree"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.cfg_parallel_size not in (1, 2):
            raise ValueError(f"cfg_parallel_size={self.cfg_parallel_size} must be 1 or 2 (guidance has two branches)")

    @property
    def layout(self) -> RankLayout:
        return RankLayout(self.tensor_parallel_size, self.ulysses_degree, self.cfg_parallel_size)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @classmethod
    def auto(cls, num_devices: int, model: ResolvedModel, device_memory_bytes: int | None = None,
             dtype: torch.dtype = torch.bfloat16,
             quantization: str | None = None) -> tuple[DiffusionParallelConfig, str]:
        """The layout the published results favour on `num_devices`, and why: tensor parallelism
        only as far as the parameters need (they must fit in AUTO_PARAMETER_SHARE of a device),
        then CFG parallel for a model whose default sampling runs two branches, then Ulysses."""
        from engine.memory_report import memory_report  # builds models on meta: only when asked

        if num_devices < 1:
            raise ValueError(f"num_devices={num_devices} must be at least 1")
        reasons, tp = [], 1
        if device_memory_bytes is not None:
            budget = AUTO_PARAMETER_SHARE * device_memory_bytes
            for tp in (size for size in range(1, num_devices + 1) if num_devices % size == 0):
                held = memory_report(model, tp, dtype, ranks=[0], quantization=quantization)[0].total
                if _fits_tp(model, tp) and held <= budget:
                    break
            else:
                raise ValueError(f"{model.name} does not fit {num_devices} device(s) of "
                                 f"{device_memory_bytes / 2**30:.1f} GiB in {dtype}: its rank 0 needs more at "
                                 "every tensor-parallel size")
            reasons.append(f"tensor_parallel_size={tp}: the smallest whose rank 0 parameters fit "
                           f"{AUTO_PARAMETER_SHARE:.0%} of {device_memory_bytes / 2**30:.1f} GiB")
        left = num_devices // tp
        cfg = 2 if left % 2 == 0 and has_two_branches(model) else 1
        if cfg == 2:
            reasons.append("cfg_parallel_size=2: the model's default sampling runs two guidance branches per step")
        left //= cfg
        ulysses = max(d for d in range(1, left + 1) if left % d == 0 and _fits_ulysses(model, tp, d))
        if ulysses > 1:
            reasons.append(f"ulysses_degree={ulysses}: the remaining devices split the tokens")
        if left // ulysses > 1:
            tp *= left // ulysses
            reasons.append(f"tensor_parallel_size={tp}: the DiT's heads do not split further by Ulysses")
        return cls(tp, ulysses, cfg), "; ".join(reasons) or "one device"


def has_two_branches(model: ResolvedModel) -> bool:
    """Whether the model's default sampling runs two DiT branches per step (true CFG or batched CFG)."""
    plan, defaults = model.family.cfg_parallel, model.defaults
    if plan.branches == "separate_calls":
        return plan.calls_twice(defaults.true_cfg_scale, defaults.negative_prompt)
    return (defaults.guidance_scale or 0) > 1


def _fits_tp(model: ResolvedModel, tp: int) -> bool:
    try:
        check_split(model, DiffusionParallelConfig(tensor_parallel_size=tp))
    except ValueError:
        return False
    return True


def _fits_ulysses(model: ResolvedModel, tp: int, ulysses: int) -> bool:
    return fewest_dit_heads(model.family, model.path, tp) >= ulysses


def worker_spec(model: ResolvedModel, parallel: DiffusionParallelConfig,
                options: EngineOptions = EngineOptions()) -> WorkerSpec:
    """One CUDA device per rank where the machine has GPUs, else the CPU with its cores shared between ranks."""
    check_split(model, parallel, options)
    offload = checked_offload(options.offload)
    world_size = parallel.world_size
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < cuda_devices < world_size:
        raise ValueError(
            f"{parallel.layout.describe()} needs {world_size} CUDA devices, one per rank, but this machine "
            f"has {cuda_devices}: use a layout of at most {cuda_devices} ranks (--parallel auto picks one), or hide "
            "the GPUs (CUDA_VISIBLE_DEVICES=) to run every rank on the CPU"
        )
    on_cuda = cuda_devices > 0
    dtype = options.dtype if options.dtype != "auto" else "bfloat16" if on_cuda else "float32"
    return WorkerSpec(
        model_path=model.path,
        family_name=model.family.name,
        layout=parallel.layout,
        device_type="cuda" if on_cuda else "cpu",
        dtype=dtype,
        master_port=free_port(),
        threads_per_rank=max(1, usable_cores() // world_size),
        load_format=options.load_format,
        quantization=options.quantization,
        text_encoder_tp_sizes=narrowed_text_encoders(model, parallel.tensor_parallel_size),
        transformer_file=options.transformer_file,
        vae_use_tiling=options.vae_use_tiling,
        vae_use_slicing=options.vae_use_slicing,
        max_loras=options.max_loras,
        max_lora_rank=options.max_lora_rank,
        offload=offload,
        cache=options.cache_settings,
        prompt_cache_bytes=options.prompt_cache_bytes,
        compiled=on_cuda if options.enforce_eager is None else not options.enforce_eager,
        compile_cache_dir=options.compile_cache_dir or default_compile_cache_dir(),
        scheduling=options.scheduling,
        max_batch_size=options.max_batch_size,
    )


def narrowed_text_encoders(model: ResolvedModel, tensor_parallel_size: int) -> dict[str, int]:
    """Text encoders sharded over fewer than all TP ranks (their heads split over no more), logged."""
    narrowed = {}
    for split in text_encoder_splits(model.family, model.path, tensor_parallel_size):
        if split.size < tensor_parallel_size:
            logger.warning("%s", describe_split(split, tensor_parallel_size))
            narrowed[split.name] = split.size
    return narrowed


def default_compile_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ditserve" / "compile")


def checked_offload(offload: dict[str, str | None]) -> dict[str, str]:
    """The offload settings that are set, each checked to name a device."""
    offload = {kind: device for kind, device in offload.items() if device}
    for kind, device in offload.items():
        if kind not in OFFLOADABLE:
            raise ValueError(f"cannot offload {kind!r}; offloadable: {', '.join(OFFLOADABLE)}")
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"{kind}_offload={device!r} is not a device name (cpu, cuda:1, ...)") from None
    return offload


def check_split(model: ResolvedModel, parallel: DiffusionParallelConfig,
                options: EngineOptions = EngineOptions()) -> None:
    """Fail before any process starts when a sharded component cannot be split over the TP ranks
    (in its GGUF blocks, if quantized so), or the DiT's heads (per TP rank) over the Ulysses ranks."""
    tp = parallel.tensor_parallel_size
    check_tensor_split(model.family, model.path, tp, options.quantization, options.transformer_file,
                       options.load_format == "dummy")
    if parallel.ulysses_degree > 1:
        fewest = fewest_dit_heads(model.family, model.path, tp, options.quantization, options.transformer_file)
        if fewest < parallel.ulysses_degree:
            raise ValueError(
                f"ulysses_degree={parallel.ulysses_degree} needs at least that many attention heads on every "
                f"tensor-parallel rank, but {model.name}'s DiT at tensor_parallel_size={tp} leaves {fewest}: "
                f"Ulysses degrees that work at this size: 1 to {fewest}")
