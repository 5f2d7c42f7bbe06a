"""Rank processes: one per device; rank 0 drives the diffusers pipeline, the others follow."""

from workers.messages import (
    CANCELLED,
    GROUP_BROKEN,
    GenerationBatch,
    GenerationFailure,
    GenerationRequest,
    GenerationResult,
    OmniDiffusionSamplingParams,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
)

__all__ = [
    "CANCELLED",
    "GROUP_BROKEN",
    "GenerationBatch",
    "GenerationFailure",
    "GenerationRequest",
    "GenerationResult",
    "OmniDiffusionSamplingParams",
    "WorkerReady",
    "WorkerSpec",
    "WorkerStartupFailed",
]
