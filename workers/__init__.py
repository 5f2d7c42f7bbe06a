"""Rank processes: one per device; rank 0 drives the diffusers pipeline, the others follow."""

from workers.messages import (
    GenerationFailure,
    GenerationRequest,
    GenerationResult,
    OmniDiffusionSamplingParams,
    WorkerEvent,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
)

__all__ = [
    "GenerationFailure",
    "GenerationRequest",
    "GenerationResult",
    "OmniDiffusionSamplingParams",
    "WorkerEvent",
    "WorkerReady",
    "WorkerSpec",
    "WorkerStartupFailed",
]
