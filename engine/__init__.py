"""The engine: resolves models, validates requests, and drives the rank processes."""

from configs import DEFAULT_MODEL, LoraAdapter, OmniDiffusionSamplingParams
from engine.async_engine import AsyncEngine, EngineState
from engine.errors import (
    EngineError,
    EngineNotReady,
    GenerationError,
    InvalidRequestError,
    LoraLoadError,
    LoraNotFound,
    QueueFull,
    RequestCancelled,
    RequestTimedOut,
    WorkerGroupDied,
    WorkerStartupError,
)
from engine.intake.sampling import PromptInput, well_served_pixels
from engine.models.resolver import ResolvedModel, resolve_model
from engine.omni import Omni
from engine.outputs import OmniRequestOutput, PartialImage, TokenUsage
from engine.parallel_config import DiffusionParallelConfig
from engine.startup import EngineConfig

__all__ = [
    "AsyncEngine",
    "DEFAULT_MODEL",
    "DiffusionParallelConfig",
    "EngineConfig",
    "EngineError",
    "EngineNotReady",
    "EngineState",
    "GenerationError",
    "InvalidRequestError",
    "LoraAdapter",
    "LoraLoadError",
    "LoraNotFound",
    "Omni",
    "OmniDiffusionSamplingParams",
    "OmniRequestOutput",
    "TokenUsage",
    "well_served_pixels",
    "PartialImage",
    "PromptInput",
    "QueueFull",
    "RequestCancelled",
    "RequestTimedOut",
    "ResolvedModel",
    "WorkerGroupDied",
    "WorkerStartupError",
    "resolve_model",
]
