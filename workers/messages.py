"""Everything that crosses the boundary between the engine and the rank processes.

These live in the lowest layer so that workers never import the engine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image

from configs import CacheSettings, EngineOptions, SamplingParams

OFFLOADABLE = ("text_encoder", "vae")  # the pipeline models --text-encoder-offload / --vae-offload keep elsewhere


@dataclass(frozen=True)
class RankLayout:
    """How the ranks of one group divide the work: rank = (cfg * ulysses_degree + ulysses) * tp + tp_rank.

    Tensor parallelism is innermost (its all-reduces run every layer: neighbours, one NVLink hop),
    then Ulysses (two all-to-alls per attention), then CFG (one exchange per step).
    """

    tensor_parallel_size: int = 1
    ulysses_degree: int = 1
    cfg_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.ulysses_degree * self.cfg_parallel_size

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(cfg group, ulysses rank, tensor-parallel rank) of `rank`."""
        tp, rest = rank % self.tensor_parallel_size, rank // self.tensor_parallel_size
        return rest // self.ulysses_degree, rest % self.ulysses_degree, tp

    def rank(self, cfg: int, ulysses: int, tp: int) -> int:
        return (cfg * self.ulysses_degree + ulysses) * self.tensor_parallel_size + tp

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks that differ only along `axis` ("tp", "ulysses" or "cfg")."""
        sizes = {"cfg": self.cfg_parallel_size, "ulysses": self.ulysses_degree, "tp": self.tensor_parallel_size}
        others = [a for a in sizes if a != axis]
        groups = []
        for i in range(sizes[others[0]]):
            for j in range(sizes[others[1]]):
                coordinates = {others[0]: i, others[1]: j}
                groups.append([self.rank(**{**coordinates, axis: k}) for k in range(sizes[axis])])
        return groups

    def describe(self) -> str:
        """e.g. "tensor_parallel_size=2 x cfg_parallel_size=2 (4 ranks)"; the sizes above 1 only."""
        sizes = {"tensor_parallel_size": self.tensor_parallel_size, "ulysses_degree": self.ulysses_degree,
                 "cfg_parallel_size": self.cfg_parallel_size}
        named = [f"{name}={size}" for name, size in sizes.items() if size > 1] or ["tensor_parallel_size=1"]
        return " x ".join(named) + (f" ({self.world_size} ranks)" if len(named) > 1 else "")


@dataclass
class WorkerSpec:
    """How every rank of one worker group is started."""

    model_path: Path
    family_name: str
    layout: RankLayout
    device_type: str  # "cuda" or "cpu"
    dtype: str  # torch dtype name, e.g. "float32"
    master_port: int
    threads_per_rank: int
    load_format: str = "auto"  # "auto": read the checkpoint; "dummy": random weights from the configs
    quantization: str | None = EngineOptions.quantization  # "fp8", "int8", "gguf" (workers/quantization)
    transformer_file: str | None = None  # the DiT's .gguf file, when not in the model folder
    # text encoder -> how many of the driver's first TP ranks it is sharded over, where fewer than all
    # (its heads split over no more: workers.planning.text_encoder_splits); 1: held whole by rank 0
    text_encoder_tp_sizes: dict[str, int] = field(default_factory=dict)
    vae_use_tiling: bool = False
    vae_use_slicing: bool = False
    max_loras: int = EngineOptions.max_loras
    max_lora_rank: int = EngineOptions.max_lora_rank
    offload: dict[str, str] = field(default_factory=dict)  # "text_encoder"/"vae" -> device kept on between uses
    cache: CacheSettings = CacheSettings()  # the server's step caching (a request may turn it off)
    prompt_cache_bytes: int = EngineOptions.prompt_cache_bytes  # the driver's prompt-embedding cache
    compiled: bool = False  # torch.compile the DiT's repeated blocks
    compile_cache_dir: str | None = None  # where compiled graphs are kept across starts
    scheduling: str = EngineOptions.scheduling  # "continuous": pipeline calls overlap, their DiT calls merge
    max_batch_size: int = EngineOptions.max_batch_size  # with continuous scheduling: rows per merged DiT call

    @property
    def world_size(self) -> int:
        return self.layout.world_size


@dataclass
class RankChannels:
    """The queues between the engine and one group's ranks (multiprocessing queues)."""

    requests: Any  # batches to the driver; None tells it to stop
    cancels: Any  # cancelled request ids to the driver
    events: Any  # ready, results and failures from every rank
    doorbells: list  # one per follower, rung by the driver when work starts
    fault_flag: Any = None  # a shared int: set by a rank that failed inside a batch (parallel_state.report_fault)


@dataclass
class GenerationRequest:
    """One prompt with every sampling value resolved; what the driver rank runs."""

    request_id: str
    prompt: str
    seed: int  # image i is drawn from seed + i
    sampling: SamplingParams
    negative_prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None  # "L", white = change; same size as images[0]
    pipeline: str = "main"  # the family's loaded pipeline, or one of its edit_pipelines (image-to-image, inpaint)
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale), added in this order
    warnings: tuple[str, ...] = ()  # for the caller (the engine's; ranks ignore them)
    text_tokens: int = 0  # the prompt's tokens the text encoder reads, for the caller's usage
    image_tokens: int = 0  # DiT tokens of the input images, for the caller's usage

    @property
    def image_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.sampling.num_outputs_per_prompt)]


@dataclass
class GenerationBatch:
    """Requests with equal SamplingParams (and negative-prompt presence) that run as one call."""

    requests: list[GenerationRequest]


class AdapterAction(enum.Enum):
    LOAD = "load"
    UNLOAD = "unload"


@dataclass
class AdapterCommand:
    """Load (from `path`) or unload a LoRA adapter on every rank; answered by AdapterCommandDone."""

    request_id: str
    action: AdapterAction
    name: str
    path: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded LoRA adapter, as the driver read it."""

    name: str
    path: str
    rank: int  # the highest rank of its layers
    components: tuple[str, ...]  # the pipeline components it adapts, e.g. ("text_encoder", "transformer")
    driver_bytes: int  # what rank 0 holds of it


@dataclass
class AdapterCommandDone:
    request_id: str
    adapter: AdapterInfo | None = None  # what a load loaded
    error: str | None = None  # why it failed; None: done
    error_code: str | None = None  # e.g. "lora_rank_too_high", "invalid_lora_adapter"


@dataclass(frozen=True)
class CompileStats:
    """torch.compile's work in one rank process (workers.parallel.compiled_blocks.compile_stats)."""

    graphs: int = 0  # graphs compiled (a recompile adds one)
    graph_breaks: int = 0  # places where tracing stopped and split a graph
    cache_hits: int = 0  # of those graphs, read back from the on-disk compile cache
    cache_misses: int = 0  # built by inductor
    seconds: float = 0.0  # spent tracing and compiling

    def __sub__(self, earlier: CompileStats) -> CompileStats:
        return CompileStats(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})

    def __add__(self, other: CompileStats) -> CompileStats:
        return CompileStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass
class GenerationResult:
    request_id: str
    images: list[Image.Image]
    seeds: list[int]  # image i was drawn from seeds[i] (= request seed + i)
    inference_s: float
    step_s: list[float]  # duration of each denoising step after the first
    batch_images: int  # images in the pipeline call this request was part of
    cached_steps: int = 0  # steps whose (conditional) DiT call skipped its blocks (workers/step_cache.py)
    prompt_cache_hits: int = 0  # the batch's text-encoder calls answered from memory (workers/prompt_cache.py)
    compiled: CompileStats = CompileStats()  # what the batch compiled on rank 0 (a shape first seen)
    phases: dict[str, float] = field(default_factory=dict)  # pre_denoise_s, denoise_s, post_denoise_s (PhaseClock)
    peak_memory_bytes: int | None = None  # rank 0's peak: CUDA allocation during the batch, CPU resident so far
    forward_rows: list[int] = field(default_factory=list)  # continuous scheduling: rows of the DiT calls run
    merged_forwards: int = 0  # ... and how many of them merged more than one pipeline call


@dataclass
class GenerationPartial:
    """A preview of one image while it is made: the decoded estimate of the final image."""

    request_id: str
    image_index: int  # which of the request's n images
    partial_index: int  # 0-based, in the order sent
    image: Image.Image


class FailureKind(enum.Enum):
    """Why a rank could not produce a request's images."""

    CANCELLED = "cancelled"  # the engine cancelled it (client gone, timeout, Ctrl-C)
    GROUP_BROKEN = "group_broken"  # a collective failed: a peer rank died
    PIPELINE_ERROR = "pipeline_error"  # the pipeline raised for this batch; the group still serves
    # continuous scheduling: another running call's fault stopped this one's collectives (run it again)
    INTERRUPTED = "interrupted"


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
    load_s_by_model: dict[str, float]  # model name -> seconds to read and place it (or its shard)


@dataclass
class WorkerStartupFailed:
    rank: int
    message: str
