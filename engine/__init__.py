"""The engine: resolves models, validates requests, and drives the rank processes."""

from workers import OmniDiffusionSamplingParams

from engine.async_engine import AsyncEngine, EngineConfig, EngineNotReady, EngineState, QueueFull
from engine.model_resolver import DEFAULT_MODEL, ResolvedModel, resolve_model
from engine.omni import Omni
from engine.outputs import GenerationError, OmniRequestOutput
from engine.parallel_config import DiffusionParallelConfig
from engine.sampling import InvalidRequestError, PromptInput
from engine.worker_group import WorkerGroupDied, WorkerStartupError

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineNotReady",
    "EngineState",
    "QueueFull",
    "DEFAULT_MODEL",
    "DiffusionParallelConfig",
    "GenerationError",
    "InvalidRequestError",
    "Omni",
    "OmniDiffusionSamplingParams",
    "OmniRequestOutput",
    "PromptInput",
    "ResolvedModel",
    "WorkerGroupDied",
    "WorkerStartupError",
    "resolve_model",
]
