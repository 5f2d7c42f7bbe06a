"""torch.compile of the DiT's blocks (enforce_eager=False): Z-Image through the engine makes the
images plain diffusers makes and compiles nothing after the warm-up (whatever the prompt, n,
guidance, LoRA adapters or a cancelled request), and a second start reads every graph from the
compile cache; Qwen-Image's true-CFG DiT step (two calls of different text lengths) equals eager
at TP=1, TP=2 and Ulysses=2 with no graph break. Compiles and cache reads are counted (timings,
from torch._dynamo's counters), never timed.

Compiling costs 20-40 s a model on this machine, so the engine here serves several checks and the
true-CFG checks run the DiT alone.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine import DiffusionParallelConfig, LoraAdapter, Omni
from engine.errors import RequestCancelled
from engine.intake.sampling import PromptInput
from tests.conftest import COMPILE_CACHE
from tests.engine.test_batching import started_engine
from tests.helpers import (
    REFERENCE_PROMPT,
    max_pixel_difference,
    rank_context,
    reference_image,
    reference_params,
    run_ranks,
)
from workers import RankLayout
from workers.parallel import forward_broadcast
from workers.parallel.cfg_parallel import DitExecutor, follower_handlers, install_dispatcher

SIZE = 64


def test_z_image_compiled_matches_diffusers_and_compiles_nothing_after_warm_up(tiny_dir, adapters, holds):
    expected = reference_image(tiny_dir("z-image"), "z-image", SIZE, SIZE)
    paths = adapters("z-image")

    async def scenario():
        engine = await started_engine(model="tiny/z-image", enforce_eager=False, warm_up=True,
                                      warmup_sizes=(f"{SIZE}x{SIZE}",), compile_cache_dir=COMPILE_CACHE,
                                      lora_modules={name: str(path) for name, path in paths.items()})
        try:
            def generate(prompt, **values):
                return engine.generate(PromptInput(prompt), reference_params("z-image", height=SIZE, width=SIZE,
                                                                             **values))

            outputs = [await generate(REFERENCE_PROMPT),
                       await generate("a longer prompt, with two images and guidance", num_outputs_per_prompt=2,
                                      guidance_scale=3.0, seed=9),
                       await generate("three", num_inference_steps=3)]
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

    # A second start of the same engine: what its first request compiles is all read back.
    with Omni(model="tiny/z-image", enforce_eager=False, compile_cache_dir=COMPILE_CACHE,
              lora_modules={name: str(path) for name, path in paths.items()}) as omni:
        timings = omni.generate(REFERENCE_PROMPT, reference_params("z-image", height=SIZE, width=SIZE))[0].timings
    assert timings["compiled_graphs"] > 0
    assert timings["compile_cache_hits"] == timings["compiled_graphs"], timings


def _compiled_dit_calls(rank, world_size, port, layout, path, compiled, steps, doorbells, results):
    """The tiny Qwen-Image DiT's true-CFG step (cond with 12 text tokens, uncond with 5) for `steps`
    steps: the last outputs and what compiled after the first step."""
    import torch

    from configs import load_family
    from workers.parallel import parallel_state
    from workers.parallel.compiled_blocks import compile_stats
    from workers.parallel.sharded_loading import dit_component, load_component_shard

    torch.set_num_threads(1)
    parallel_state.initialize(rank, layout, "cpu", port)
    family = load_family("qwen-image")
    dit = load_component_shard(dit_component(family), path, parallel_state.rank_in("tp"),
                               parallel_state.size_of("tp"), torch.device("cpu"), torch.float32)
    executor = DitExecutor(dit, family.sequence_parallel, compiled)
    if rank:
        forward_broadcast.follow(follower_handlers("transformer", executor, {}), doorbells[rank - 1], lambda: True)
        parallel_state.shutdown()
        return
    dispatcher = install_dispatcher("transformer", dit, executor, family.cfg_parallel)
    generator = torch.Generator().manual_seed(0)
    side = SIZE // 16
    latents = torch.randn(1, side * side, dit.config.in_channels, generator=generator)
    calls = [dict(hidden_states=latents, timestep=torch.tensor([0.5]), guidance=None,
                  encoder_hidden_states=torch.randn(1, tokens, dit.config.joint_attention_dim, generator=generator),
                  encoder_hidden_states_mask=torch.ones(1, tokens, dtype=torch.long), img_shapes=[[(1, side, side)]],
                  return_dict=False) for tokens in (12, 5)]
    forward_broadcast.ring(doorbells)
    dispatcher.begin(pairs=True)
    with torch.inference_mode():
        for step in range(steps):
            if step == 1:
                after_first_step = compile_stats()
            outputs = [dit(**call)[0].numpy().copy() for call in calls]
            dispatcher.check_settled()
    if world_size > 1:
        forward_broadcast.send(forward_broadcast.STOP)
    results.put((rank, outputs, compile_stats(), compile_stats() - after_first_step))
    parallel_state.shutdown()


@pytest.mark.parametrize("layout", [RankLayout(), RankLayout(tensor_parallel_size=2), RankLayout(ulysses_degree=2)],
                         ids=["tp1", "tp2", "ulysses2"])
def test_true_cfg_dit_compiled_equals_eager_in_one_graph_per_block(tiny_dir, layout):
    """Qwen-Image's true-CFG step: compiled = eager within fp32 rounding; no graph break (at TP=2 and
    Ulysses=2 the collectives are inside the block's graph); nothing compiled after the first step."""
    path = tiny_dir("qwen-image") / "transformer"
    outputs = {}
    for compiled in (False, True):
        doorbells = [rank_context().Queue() for _ in range(layout.world_size - 1)]
        [(_, outputs[compiled], total, later)] = run_ranks(_compiled_dit_calls, layout.world_size, layout, path,
                                                           compiled, 3, doorbells, reports=1)
    for eager, compiled in zip(outputs[False], outputs[True]):
        np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    assert total.graphs >= 1 and total.graph_breaks == 0, total
    assert later.graphs == 0, later


def test_enforce_eager_is_the_cpu_default_and_compiled_can_be_asked_for():
    from engine.models.resolver import resolve_model
    from engine.parallel_config import worker_spec
    from engine.startup import EngineConfig

    model = resolve_model("tiny/z-image")
    assert not worker_spec(model, DiffusionParallelConfig()).compiled
    assert worker_spec(model, DiffusionParallelConfig(), EngineConfig(enforce_eager=False)).compiled
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        EngineConfig(warmup_sizes=("1024",))
