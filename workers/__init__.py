"""Rank processes: one per device; rank 0 drives the diffusers pipeline, the others follow."""

from workers.messages import (
    GROUP_BROKEN,
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
    "GROUP_BROKEN",
    "GenerationFailure",
    "GenerationRequest",
    "GenerationResult",
    "OmniDiffusionSamplingParams",
    "WorkerEvent",
    "WorkerReady",
    "WorkerSpec",
    "WorkerStartupFailed",
]
