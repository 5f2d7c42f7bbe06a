"""torch.compile of the DiT's blocks (enforce_eager=False) through the engine: tiny Z-Image makes
the images plain diffusers makes and compiles nothing after the warm-up (whatever the prompt, n,
guidance, LoRA adapters or a cancelled request); benchmarks/gpu_check.sh runs on CPU, and its
second start reads every graph from the compile cache. Compiles and cache reads are counted
(timings, from torch._dynamo's counters), never timed. The layouts: test_compiled_layouts.py.

Compiling costs 20-40 s a model on this machine, so one engine serves several checks, and the GPU
check runs after it on the same compile cache.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine import DiffusionParallelConfig, LoraAdapter
from engine.errors import RequestCancelled
from engine.intake.sampling import PromptInput
from tests.conftest import COMPILE_CACHE
from tests.engine.test_batching import started_engine
from tests.helpers import (
    REFERENCE_PROMPT,
    max_pixel_difference,
    reference_image,
    reference_params,
)

SIZE = 64
ROOT = Path(__file__).resolve().parents[2]


def test_z_image_compiled_matches_diffusers_and_compiles_nothing_after_warm_up(tiny_dir, adapters, holds):
    expected = reference_image(tiny_dir("z-image"), "z-image", SIZE, SIZE)
    paths = adapters("z-image")

    async def scenario():
        engine = await started_engine(model="tiny/z-image", enforce_eager=False, warm_up=True,
                                      warmup_sizes=(f"{SIZE}x{SIZE}",), compile_cache_dir=COMPILE_CACHE)
        try:
            def generate(prompt, **values):
                return engine.generate(PromptInput(prompt), reference_params("z-image", height=SIZE, width=SIZE,
                                                                             **values))

            outputs = [await generate(REFERENCE_PROMPT),
                       await generate("a longer prompt, with two images and guidance", num_outputs_per_prompt=2,
                                      guidance_scale=3.0, seed=9),
                       await generate("three", num_inference_steps=3)]
            for name, path in paths.items():  # loaded after the graphs were compiled
                await engine.load_lora(name, str(path))
            with_lora = [await generate(REFERENCE_PROMPT, loras=[LoraAdapter("a", 0.7)]),
                         await generate(REFERENCE_PROMPT, loras=[LoraAdapter("b", 1.5)])]
            holds.arm()
            cancelled = asyncio.ensure_future(generate("cancelled mid-way", num_inference_steps=50))
            while not holds.held():
                await asyncio.sleep(0.02)
            cancelled.cancel()
            holds.release()
            with pytest.raises((asyncio.CancelledError, RequestCancelled)):
                await cancelled
            outputs.append(await generate(REFERENCE_PROMPT))
            return outputs, with_lora
        finally:
            await engine.shutdown()

    outputs, with_lora = asyncio.run(scenario())
    for output in outputs + with_lora:
        assert "compiled_graphs" not in output.timings, output.timings
    assert max_pixel_difference(outputs[0].images[0], expected) <= 1
    assert max_pixel_difference(outputs[-1].images[0], expected) <= 1  # after the cancelled request
    assert all(image.size == (SIZE, SIZE) for output in outputs for image in output.images)
    for output, (name, scale) in zip(with_lora, (("a", 0.7), ("b", 1.5))):
        lora_expected = reference_image(tiny_dir("z-image"), "z-image", SIZE, SIZE, loras=((paths[name], scale),))
        assert max_pixel_difference(output.images[0], lora_expected) <= 1, name



def test_gpu_check_runs_on_cpu_and_a_second_start_compiles_nothing_new():
    """benchmarks/gpu_check.sh works before anyone spends GPU time on it: without CUDA it runs its
    whole path (plain diffusers, the engine eager, compiled, a second compiled start, eager with FP8
    weights) on a tiny model.
    On the run's compile cache, after the test above: what the second start compiles is all read back."""
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--size", str(SIZE), "--steps", "2",
                           "--compile-cache-dir", COMPILE_CACHE], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row.split("|")[2].strip(): row for row in done.stdout.splitlines() if row.startswith("| tiny/z-image")}
    assert set(rows) == {"plain diffusers", "engine, eager", "engine, compiled", "engine, eager, fp8 weights",
                         "weights on rank 0"}, done.stdout
    for run in ("plain diffusers", "engine, eager", "engine, compiled", "engine, eager, fp8 weights"):
        assert float(rows[run].split("|")[3]) > 0, rows[run]
    first, read, built = map(int, re.search(r"first start [\d.]+ s \((\d+) graphs.*second start [\d.]+ s "
                                            r"\((\d+) of (\d+) read", rows["engine, compiled"]).groups())
    assert first > 0 and read == built > 0, rows["engine, compiled"]
    assert "transformer" in rows["weights on rank 0"] and "with fp8: transformer" in rows["weights on rank 0"]


def test_enforce_eager_is_the_cpu_default_and_compiled_can_be_asked_for():
    from engine.models.resolver import resolve_model
    from engine.parallel_config import worker_spec
    from engine.startup import EngineConfig

    model = resolve_model("tiny/z-image")
    assert not worker_spec(model, DiffusionParallelConfig()).compiled
    assert worker_spec(model, DiffusionParallelConfig(), EngineConfig(enforce_eager=False)).compiled
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        EngineConfig(warmup_sizes=("1024",))
