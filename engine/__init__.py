"""The engine: resolves models, validates requests, and drives the rank processes."""

from workers import OmniDiffusionSamplingParams

from engine.model_resolver import DEFAULT_MODEL, ResolvedModel, resolve_model
from engine.omni import GenerationError, Omni, OmniRequestOutput
from engine.parallel_config import DiffusionParallelConfig
from engine.worker_group import WorkerGroupDied, WorkerStartupError

__all__ = [
    "DEFAULT_MODEL",
    "DiffusionParallelConfig",
    "GenerationError",
    "Omni",
    "OmniDiffusionSamplingParams",
    "OmniRequestOutput",
    "ResolvedModel",
    "WorkerGroupDied",
    "WorkerStartupError",
    "resolve_model",
]
