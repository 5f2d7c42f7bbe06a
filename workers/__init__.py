"""Rank processes: one per device; rank 0 drives the diffusers pipeline, the others follow."""

from workers.messages import (
    OFFLOADABLE,
    AdapterAction,
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
    "OFFLOADABLE",
    "AdapterAction",
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
