"""Everything that crosses the boundary between the engine and the rank processes.

These live in the lowest layer so that workers never import the engine; the engine re-exports
the user-facing ones (`OmniDiffusionSamplingParams`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class OmniDiffusionSamplingParams:
    """What a caller may ask for; every field left as None takes the model family's default."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    num_outputs_per_prompt: int = 1
    max_sequence_length: int | None = None


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


@dataclass
class GenerationRequest:
    """One prompt with every sampling value resolved; what the driver rank runs."""

    request_id: str
    prompt: str
    seed: int
    num_inference_steps: int
    num_outputs: int = 1
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class GenerationBatch:
    """Requests that share every pipeline-wide value (size, steps, guidance, n) and run as one call."""

    requests: list[GenerationRequest]


@dataclass
class GenerationResult:
    request_id: str
    images: list[Image.Image]
    seeds: list[int]  # image i was drawn from seeds[i] (= request seed + i)
    inference_s: float
    step_s: list[float]  # duration of each denoising step after the first
    batch_images: int  # images in the pipeline call this request was part of


GROUP_BROKEN = "group_broken"  # GenerationFailure.error_type when a peer rank failed
CANCELLED = "cancelled"  # ... when the engine cancelled the request


@dataclass
class GenerationFailure:
    request_id: str
    message: str
    error_type: str


@dataclass
class WorkerReady:
    rank: int
    load_s: float
    parameter_bytes: dict[str, int]  # component name -> bytes of parameters and buffers held


@dataclass
class WorkerStartupFailed:
    rank: int
    message: str
