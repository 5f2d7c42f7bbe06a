"""User-facing parallelism and device settings, and how they become a WorkerSpec."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model_resolver import ResolvedModel
from engine.worker_group import free_port, usable_cores
from workers import WorkerSpec
from workers.sharded_loading import component_config, sharded_components
from workers.tensor_parallel import ShardPlanner

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DiffusionParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be at least 1")


LOAD_FORMATS = ("auto", "dummy")


def worker_spec(
    model: ResolvedModel, parallel: DiffusionParallelConfig, dtype: str = "auto", load_format: str = "auto"
) -> WorkerSpec:
    """One CUDA device per rank where the machine has GPUs, else the CPU with its cores shared between ranks."""
    check_tensor_parallel_size(model, parallel.tensor_parallel_size)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported; use one of {', '.join(LOAD_FORMATS)}")
    world_size = parallel.tensor_parallel_size
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < cuda_devices < world_size:
        raise ValueError(
            f"tensor_parallel_size={world_size} needs {world_size} CUDA devices, one per rank, but this machine "
            f"has {cuda_devices}: use a tensor-parallel size of at most {cuda_devices}, or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES=) to run every rank on the CPU"
        )
    on_cuda = cuda_devices > 0
    if dtype == "auto":
        dtype = "bfloat16" if on_cuda else "float32"
    return WorkerSpec(
        model_path=model.path,
        family_name=model.family.name,
        world_size=world_size,
        device_type="cuda" if on_cuda else "cpu",
        dtype=dtype,
        master_port=free_port(),
        threads_per_rank=max(1, usable_cores() // world_size),
        load_format=load_format,
    )


def check_tensor_parallel_size(model: ResolvedModel, world_size: int) -> None:
    """Fail before any process starts when a sharded component cannot be split over `world_size` ranks."""
    for component in sharded_components(model.family, model.path):
        config = component_config(component.library, component.class_name, model.path / component.name)
        try:
            ShardPlanner(component.plan, config, rank=0, world_size=world_size)
        except ValueError as exc:
            if component.name == "transformer":
                raise
            raise ValueError(f"{component.name} ({component.class_name}): {exc}") from None
