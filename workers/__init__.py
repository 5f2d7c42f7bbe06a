"""Rank processes: one per device; rank 0 drives the diffusers pipeline, the others follow."""

from workers.messages import (
    AdapterCommand,
    AdapterCommandDone,
    AdapterInfo,
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
    "AdapterInfo",
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
