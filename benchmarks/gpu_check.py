"""The ready GPU check: each model at its true size with random weights (--load-format dummy), so
no checkpoint is needed, on one device:

- seconds per denoising step of plain diffusers (its own pipeline around the same random models),
  of the engine eager, and of the engine compiled;
- compile seconds of the first request, on a first start (cold: an empty compile cache) and on a
  second start that reads the cache, and how many graphs the cache answered;
- the weights each component holds, and the peak device memory of a request (CUDA);
- the engine eager with FP8 weights (--quantization fp8): on GPUs with FP8 tensor cores its
  layers run scaled FP8 matmuls (workers/quantization/weights.py), elsewhere dequantize per call.

On CUDA the defaults are Z-Image-Turbo and Qwen-Image at 1024x1024, bf16, 8 steps (under 8 minutes
on one H100/H200). Without CUDA the defaults are a tiny model at 64x64 in fp32: the same code path,
so the script is known to work before anyone spends GPU time on it (tests/engine/test_compile.py
runs it that way).

    bash benchmarks/gpu_check.sh [--models Tongyi-MAI/Z-Image-Turbo Qwen/Qwen-Image] [--size 1024] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is the repository's, not installed

from engine import Omni, OmniDiffusionSamplingParams, resolve_model  # noqa: E402
from engine.memory_report import format_size  # noqa: E402
from workers.parallel.sharded_loading import load_whole_model, unsharded_models  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"
ON_CUDA = torch.cuda.is_available()


def plain_diffusers(model: str, size: int, steps: int, dtype: str) -> float:
    """Seconds per step of diffusers' own pipeline, every model random at its true size."""
    resolved = resolve_model(model, configs_only=True)
    device, torch_dtype = torch.device("cuda" if ON_CUDA else "cpu"), getattr(torch, dtype)
    components = {name: load_whole_model(library, class_name, resolved.path / name, device, torch_dtype, dummy=True)
                  for name, (library, class_name) in unsharded_models(resolved.path, set()).items()}
    pipeline = getattr(diffusers, resolved.family.pipeline_class).from_pretrained(
        resolved.path, torch_dtype=torch_dtype, **components)
    pipeline.set_progress_bar_config(disable=True)
    step_ends: list[float] = []

    def after_step(pipeline, step, timestep, tensors):
        if ON_CUDA:
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        return tensors

    with torch.inference_mode():
        pipeline(prompt=PROMPT, height=size, width=size, num_inference_steps=steps,
                 generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=after_step)
    del pipeline, components
    if ON_CUDA:
        torch.cuda.empty_cache()
    return statistics.mean(b - a for a, b in zip(step_ends, step_ends[1:]))


def engine_run(model: str, size: int, steps: int, dtype: str, **options) -> tuple[dict, dict, dict[str, int]]:
    """The first request's timings (it compiles, if anything does), a second one's, and the bytes
    each component holds on rank 0."""
    params = OmniDiffusionSamplingParams(height=size, width=size, num_inference_steps=steps, seed=0)
    with Omni(model=model, load_format="dummy", dtype=dtype, **options) as omni:
        first = omni.generate(PROMPT, params)[0].timings
        second = omni.generate(PROMPT, params)[0].timings
        held = omni.rank_parameter_bytes()[0]
    return first, second, held


def check(model: str, size: int, steps: int, dtype: str, cache: str) -> list[str]:
    rows = []
    plain = plain_diffusers(model, size, steps, dtype)
    _, eager, held = engine_run(model, size, steps, dtype, enforce_eager=True)
    first, compiled, _ = engine_run(model, size, steps, dtype, enforce_eager=False, compile_cache_dir=cache)
    second, _, _ = engine_run(model, size, steps, dtype, enforce_eager=False, compile_cache_dir=cache)
    weights = ", ".join(f"{name} {format_size(size_bytes)}" for name, size_bytes in held.items())
    rows.append(f"| {model} | plain diffusers | {plain:.3f} | 1.00x | - | - |")
    rows.append(f"| {model} | engine, eager | {eager['step_s']:.3f} | {plain / eager['step_s']:.2f}x | - | "
                f"{_mib(eager)} |")
    rows.append(f"| {model} | engine, compiled | {compiled['step_s']:.3f} | {plain / compiled['step_s']:.2f}x | "
                f"first start {first.get('compile_s', 0):.1f} s ({first.get('compiled_graphs', 0)} graphs, "
                f"{first.get('compile_cache_hits', 0)} read from the cache); second start "
                f"{second.get('compile_s', 0):.1f} s ({second.get('compile_cache_hits', 0)} of "
                f"{second.get('compiled_graphs', 0)} read) | {_mib(compiled)} |")
    _, fp8, held_fp8 = engine_run(model, size, steps, dtype, enforce_eager=True, quantization="fp8")
    rows.append(f"| {model} | engine, eager, fp8 weights | {fp8['step_s']:.3f} | {plain / fp8['step_s']:.2f}x | - | "
                f"{_mib(fp8)} |")
    rows.append(f"| {model} | weights on rank 0 | {weights}; with fp8: transformer "
                f"{format_size(held_fp8['transformer'])} | | | |")
    return rows


def _mib(timings: dict) -> str:
    return f"{timings['peak_memory_mb']:.0f}" if "peak_memory_mb" in timings else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["Tongyi-MAI/Z-Image-Turbo", "Qwen/Qwen-Image"] if ON_CUDA
                        else ["tiny/z-image"])
    parser.add_argument("--size", type=int, default=1024 if ON_CUDA else 64)
    parser.add_argument("--steps", type=int, default=8 if ON_CUDA else 3)
    parser.add_argument("--dtype", default="bfloat16" if ON_CUDA else "float32")
    parser.add_argument("--compile-cache-dir", default=None,
                        help="where compiled graphs go (default: a new temporary folder, so the first start is cold)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if ON_CUDA else "CPU (no CUDA: a small model)"
    print(f"{device}, {args.size}x{args.size}, {args.steps} steps, {args.dtype}, random weights at true size, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}\n")
    print("| model | run | s/step | speed vs diffusers | compile (first request) | peak MiB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as temporary:
        for model in args.models:
            for row in check(model, args.size, args.steps, args.dtype, args.compile_cache_dir or temporary):
                print(row, flush=True)


if __name__ == "__main__":
    main()
