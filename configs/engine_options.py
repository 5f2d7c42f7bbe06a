"""The engine's options: one type whose field defaults are the defaults everywhere.

`engine.EngineConfig` extends it with the model and its rank layout; `Omni(model, **options)`
takes its fields as keywords; `serve`'s flags take their defaults from it. It lives here, not in
the engine, so `serve --help` can build its parser without importing torch and diffusers.
Adding an option: a field here, a flag in server/cli.py (its `dest` is the field's name), and
the code that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from configs.caching import CacheSettings
from configs.sampling import OmniDiffusionSamplingParams

DEFAULT_MODEL = "builtin/shapes"
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")  # dummy: the full-size model from its configuration, random weights


def parse_size(size: str) -> tuple[int, int]:
    """"1024x768" -> (1024, 768); ValueError naming the expected form."""
    width, separator, height = size.lower().partition("x")
    if not (separator and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ValueError(f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
    return int(width), int(height)


SCHEDULING = ("request", "continuous")
QUANTIZATIONS = ("fp8", "int8", "gguf")  # vLLM's --quantization names; "gguf:Q4_K" names a dummy load's type


def check_quantization(text: str | None) -> None:
    if text and text.partition(":")[0].lower() not in QUANTIZATIONS:
        raise ValueError(f"quantization={text!r} is not one of {', '.join(QUANTIZATIONS)} (or gguf:<type>)")


@dataclass(frozen=True)
class EngineOptions:
    dtype: str = "auto"  # parameter dtype; auto: bfloat16 on CUDA, float32 on CPU
    load_format: str = "auto"  # "dummy": full-size random weights from the configurations, no checkpoint
    # Weights kept quantized (workers/quantization/): "fp8", "int8" (per-channel, weight-only), "gguf"
    # (the DiT from a .gguf file: the model folder's transformer/*.gguf or `transformer_file`)
    quantization: str | None = None
    transformer_file: str | None = None  # a .gguf file that replaces the model folder's transformer weights
    # diffusers' VAE tiling (decode in overlapping tiles) and slicing (one image of a batch at a time)
    vae_use_tiling: bool = False
    vae_use_slicing: bool = False
    default_overrides: OmniDiffusionSamplingParams = field(default_factory=OmniDiffusionSamplingParams)
    # Reading 50+ GB of weights from a slow disk takes minutes; waiting for it costs nothing, because
    # the ranks that finish first wait outside any timed collective (forward_broadcast's doorbell).
    startup_timeout_s: float = 1800.0  # for every rank to load
    warm_up: bool = True  # one generation at the fewest steps before serving (the online engine)
    # torch.compile of the DiT's repeated blocks (workers/parallel/compiled_blocks.py). None: compiled
    # on CUDA, eager on CPU, where inductor gains little (docs/benchmarks.md: GEMMs and attention are
    # ~90% of a CPU step and compile leaves them to the same kernels) and costs 10-40 s per start.
    enforce_eager: bool | None = None
    # Sizes ("WIDTHxHEIGHT") compiled and run before serving; () with compile: the family's default size
    warmup_sizes: tuple[str, ...] = ()
    compile_cache_dir: str | None = None  # compiled graphs kept across starts; None: ~/.cache/ditserve/compile
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> path, loaded at start
    max_loras: int = 4  # adapters resident on the ranks at once (the least recently used dropped beyond)
    max_lora_rank: int = 128  # adapters of a higher rank are refused
    text_encoder_offload: str | None = None  # device the text encoders stay on between uses ("cpu")
    vae_offload: str | None = None  # device the VAE stays on between uses
    # The most work one request may ask for: width x height / 1e6 x steps x n (None: no cap). 1000
    # admits 2048x2048 x 50 steps x 4 images (840) and refuses the schema's extreme (8389).
    max_megapixel_steps: float | None = 1000.0
    request_timeout_s: float | None = None  # seconds before a request fails RequestTimedOut (None: no limit)
    cache_backend: str = "none"  # step caching: none, first_block_cache, taylorseer, magcache (configs/caching.py)
    cache_config: dict = field(default_factory=dict)  # that backend's knobs, e.g. {"threshold": 0.1}
    # The text encoders' outputs kept for prompts seen before (workers/prompt_cache.py), on the
    # driver rank's device; 0 turns it off. 256 MiB holds ~350 Qwen-Image prompts (3584 x ~100 bf16).
    prompt_cache_bytes: int = 256 * 2**20
    # Finished images kept to answer an identical request that names its seed (engine.outputs
    # .ResultCache; 0 turns it off). 256 MiB holds ~85 RGB images of 1024x1024.
    result_cache_bytes: int = 256 * 2**20
    # The online engine's queue (Omni runs the prompts of one call in order):
    max_queue_size: int = 64  # requests admitted at once (waiting or running); more get QueueFull (429)
    max_batch_size: int = 8  # images per pipeline call, and per merged DiT call with continuous scheduling
    # "continuous": a request starts at the next denoising step of those running, and the DiT calls
    # of running requests with the same shapes merge (workers/parallel/step_merger.py); "request":
    # one pipeline call at a time, a request waits for the running one to finish.
    scheduling: str = "request"
    max_active_requests: int = 8  # continuous: pipeline calls running at once
    # False under a supervisor that replaces the whole server (a Ray Serve replica): a dead rank
    # leaves the engine FAILED instead of restarting the worker group in place
    restart_workers: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={self.load_format!r} is not supported; use one of {', '.join(LOAD_FORMATS)}")
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"scheduling={self.scheduling!r} is not one of {', '.join(SCHEDULING)}")
        for name in ("max_queue_size", "max_batch_size", "max_loras", "max_lora_rank", "max_active_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("request_timeout_s", "max_megapixel_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive (or None: no limit)")
        for name in ("prompt_cache_bytes", "result_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 0 (0: no cache)")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s} must be positive")
        CacheSettings.of(self.cache_backend, self.cache_config)  # an unknown backend or knob: ValueError
        check_quantization(self.quantization)
        if self.transformer_file and (self.quantization or "").partition(":")[0] != "gguf":
            raise ValueError("transformer_file is a .gguf file: it needs quantization='gguf'")
        for size in self.warmup_sizes:
            parse_size(size)

    @property
    def warmup_dimensions(self) -> list[tuple[int, int]]:
        """warmup_sizes as (width, height)."""
        return [parse_size(size) for size in self.warmup_sizes]

    @property
    def cache_settings(self) -> CacheSettings:
        return CacheSettings.of(self.cache_backend, self.cache_config)

    @property
    def offload(self) -> dict[str, str | None]:
        return {"text_encoder": self.text_encoder_offload, "vae": self.vae_offload}
