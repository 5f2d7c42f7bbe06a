"""Rank processes: one per device; rank 0 drives the diffusers pipeline, the others follow."""

from workers.messages import (
    FailureKind,
    GenerationBatch,
    GenerationFailure,
    GenerationPartial,
    GenerationRequest,
    GenerationResult,
    RankChannels,
    RankLayout,
    WorkerReady,
    WorkerSpec,
    WorkerStartupFailed,
)

__all__ = [
    "FailureKind",
    "GenerationBatch",
    "GenerationFailure",
    "GenerationPartial",
    "GenerationRequest",
    "GenerationResult",
    "RankChannels",
    "RankLayout",
    "WorkerReady",
    "WorkerSpec",
    "WorkerStartupFailed",
]
