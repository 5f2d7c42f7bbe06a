"""Everything that crosses the boundary between the engine and the rank processes.

These live in the lowest layer so that workers never import the engine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from configs import SamplingParams


@dataclass
class WorkerSpec:
    """How every rank of one worker group is started."""

    model_path: Path
    family_name: str
    world_size: int
    device_type: str  # "cuda" or "cpu"
    dtype: str  # torch dtype name, e.g. "float32"
    master_port: int
    threads_per_rank: int
    load_format: str = "auto"  # "auto": read the checkpoint; "dummy": random weights from the configs


@dataclass
class RankChannels:
    """The queues between the engine and one group's ranks (multiprocessing queues)."""

    requests: Any  # batches to the driver; None tells it to stop
    cancels: Any  # cancelled request ids to the driver
    events: Any  # ready, results and failures from every rank
    doorbells: list  # one per follower, rung by the driver when work starts


@dataclass
class GenerationRequest:
    """One prompt with every sampling value resolved; what the driver rank runs."""

    request_id: str
    prompt: str
    seed: int  # image i is drawn from seed + i
    sampling: SamplingParams
    negative_prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)

    @property
    def image_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.sampling.num_outputs_per_prompt)]


@dataclass
class GenerationBatch:
    """Requests with equal SamplingParams (and negative-prompt presence) that run as one call."""

    requests: list[GenerationRequest]


@dataclass
class GenerationResult:
    request_id: str
    images: list[Image.Image]
    seeds: list[int]  # image i was drawn from seeds[i] (= request seed + i)
    inference_s: float
    step_s: list[float]  # duration of each denoising step after the first
    batch_images: int  # images in the pipeline call this request was part of


class FailureKind(enum.Enum):
    """Why a rank could not produce a request's images."""

    CANCELLED = "cancelled"  # the engine cancelled it (client gone, timeout, Ctrl-C)
    GROUP_BROKEN = "group_broken"  # a collective failed: a peer rank died
    PIPELINE_ERROR = "pipeline_error"  # the pipeline raised for this batch; the group still serves


@dataclass
class GenerationFailure:
    request_id: str
    message: str
    kind: FailureKind


@dataclass
class WorkerReady:
    rank: int
    load_s: float
    parameter_bytes: dict[str, int]  # component name -> bytes of parameters and buffers held
    shard_load_s: dict[str, float]  # sharded component name -> seconds to read and place its shard


@dataclass
class WorkerStartupFailed:
    rank: int
    message: str
