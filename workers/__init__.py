"""Rank processes: one per device; rank 0 drives the diffusers pipeline, the others follow."""

from workers.messages import (
    AdapterCommand,
    AdapterCommandDone,
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
    "AdapterCommand",
    "AdapterCommandDone",
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
