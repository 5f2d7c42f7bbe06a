"""Continuous scheduling: requests join the running ones at the next denoising step, their DiT calls
merge, and every image is the image the request gets alone.

Events, not seconds: a request "joins mid-way" once the running request's first preview arrived;
"finishes first" is checked as the long request still running when the short one is done. Which
forwards merge depends on when each call reaches its first step, so these tests check that every
image is right whatever merged; tests/workers/test_step_merger.py checks the merging itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from engine import AsyncEngine, DiffusionParallelConfig, LoraAdapter, OmniDiffusionSamplingParams, PromptInput
from engine.scheduler import concurrency_key
from tests.conftest import FAULT_FILE
from tests.engine.test_batching import item, started_engine
from tests.helpers import condition_image, condition_images, max_pixel_difference

SIZE = {"height": 64, "width": 64}


async def _first_preview(engine: AsyncEngine, prompt: PromptInput, params: OmniDiffusionSamplingParams):
    """Start a request; return its task once its first preview arrived (it is denoising)."""
    previewed = asyncio.Event()
    task = asyncio.ensure_future(engine.generate(prompt, params, on_partial=lambda _: previewed.set()))
    await previewed.wait()
    return task


def test_only_batches_with_the_same_adapters_and_no_step_caching_run_at_once():
    """Adapters act on the whole DiT and a skip decision is one per call: such batches take turns."""
    plain, other_size = item("a"), item("b", steps=9, side=128)
    styled, styled_too = item("c"), item("d")
    for entry in (styled, styled_too):
        entry.request.loras = (("style", 0.8),)
    caching = item("e")
    caching.request.sampling = dataclasses.replace(caching.request.sampling, cache="on")
    assert concurrency_key(plain) == concurrency_key(other_size)
    assert concurrency_key(styled) == concurrency_key(styled_too) != concurrency_key(plain)
    assert concurrency_key(caching) != concurrency_key(item("e"))
    retried = item("f")
    retried.alone = True
    assert concurrency_key(retried) != concurrency_key(plain)


def _requests(family: str) -> list[tuple[PromptInput, OmniDiffusionSamplingParams]]:
    """Requests that differ in everything a request may: steps, guidance, seed, n, prompt length."""
    images = condition_images(family)

    def prompt(text: str, negative: str | None = None) -> PromptInput:
        return PromptInput(text, negative, images=images)

    return [  # the first and the last have prompts of one length and start together: their DiT calls merge
        (prompt("a red fox", "blurry"), OmniDiffusionSamplingParams(num_inference_steps=6, seed=2, **SIZE)),
        (prompt("a whale in a very long and detailed ocean scene", "ugly"),
         OmniDiffusionSamplingParams(num_inference_steps=5, seed=3, guidance_scale=2.5, true_cfg_scale=3.0, **SIZE)),
        (prompt("sky", "dark"), OmniDiffusionSamplingParams(num_inference_steps=4, seed=4, num_outputs_per_prompt=2,
                                                            **SIZE)),
        (prompt("a red cat", "blurry"), OmniDiffusionSamplingParams(num_inference_steps=7, seed=5, **SIZE)),
    ]


async def _joined_then_alone(family: str, **layout):
    engine = await started_engine(model=f"tiny/{family}", scheduling="continuous", warm_up=False, **layout)
    images = condition_images(family)
    long = (PromptInput("a lighthouse on a cliff at night", "blurry", images=images),
            OmniDiffusionSamplingParams(num_inference_steps=10, seed=1, partial_images=2, **SIZE))
    try:
        running = await _first_preview(engine, *long)
        joined = await asyncio.gather(*(engine.generate(*request) for request in _requests(family)))
        together = [await running, *joined]
        alone = [await engine.generate(*request) for request in [long, *_requests(family)]]
    finally:
        await engine.shutdown()
    return together, alone


@pytest.mark.parametrize("family", ["z-image", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "flux",
                                    "sd3"])
def test_a_request_that_joins_mid_way_gets_the_image_it_gets_alone(family):
    together, alone = asyncio.run(_joined_then_alone(family))
    for joined, single in zip(together, alone):
        assert len(joined.images) == len(single.images) and joined.seeds == single.seeds
        for a, b in zip(joined.images, single.images):
            assert max_pixel_difference(a, b) <= 1


def test_joining_in_a_hybrid_layout_changes_no_image():
    """TP=2 x CFG-parallel 2: true-CFG pairs of several requests merge per guidance branch."""
    together, alone = asyncio.run(_joined_then_alone(
        "qwen-image", parallel_config=DiffusionParallelConfig(tensor_parallel_size=2, cfg_parallel_size=2)))
    for joined, single in zip(together, alone):
        for a, b in zip(joined.images, single.images):
            assert max_pixel_difference(a, b) <= 1


async def _short_during_long():
    engine = await started_engine(model="tiny/z-image", scheduling="continuous", warm_up=False)
    try:
        # the most steps a request may ask for; its first preview comes after step ~50, so the
        # short one has ~150 rounds (one step each) to finish in
        long = await _first_preview(engine, PromptInput("a long walk on a beach"),
                                    OmniDiffusionSamplingParams(num_inference_steps=200, partial_images=3, **SIZE))
        short = await engine.generate(PromptInput("a cat"), OmniDiffusionSamplingParams(num_inference_steps=4, **SIZE))
        long_still_running = not long.done()
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)
    finally:
        await engine.shutdown()
    return short, long_still_running


def test_a_short_request_finishes_while_a_long_one_runs():
    short, long_still_running = asyncio.run(_short_during_long())
    assert len(short.images) == 1 and short.images[0].size == (64, 64)
    assert long_still_running


async def _cancel_one_of_a_shared_forward():
    engine = await started_engine(model="tiny/z-image", scheduling="continuous", warm_up=False)
    kept = (PromptInput("a blue boat"), OmniDiffusionSamplingParams(num_inference_steps=12, seed=8, **SIZE))
    try:
        doomed = await _first_preview(engine, PromptInput("a blue boot"),
                                      OmniDiffusionSamplingParams(num_inference_steps=12, seed=9, partial_images=3,
                                                                  **SIZE))
        survivor = asyncio.ensure_future(engine.generate(*kept))
        previews = asyncio.Event()
        joined = asyncio.ensure_future(engine.generate(
            PromptInput("a blue boat"), OmniDiffusionSamplingParams(num_inference_steps=6, seed=10, partial_images=2,
                                                                    **SIZE), on_partial=lambda _: previews.set()))
        await previews.wait()  # all three are denoising together
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        results = [await survivor, await joined]
        alone = await engine.generate(*kept)
    finally:
        await engine.shutdown()
    return results, alone, doomed


def test_cancelling_one_request_of_a_shared_forward_leaves_the_others_images():
    (survivor, joined), alone, doomed = asyncio.run(_cancel_one_of_a_shared_forward())
    assert doomed.cancelled()
    assert max_pixel_difference(survivor.images[0], alone.images[0]) <= 1
    assert joined.images[0].size == (64, 64)


def test_an_edit_joins_generations_of_a_text_to_image_model():
    """Image-to-image requests have their own pipeline calls: they run beside generations."""
    async def run():
        engine = await started_engine(model="tiny/z-image", scheduling="continuous", warm_up=False)
        edit = (PromptInput("a red square", images=[condition_image((64, 64))]),
                OmniDiffusionSamplingParams(num_inference_steps=6, seed=3, strength=0.8, **SIZE))
        try:
            running = await _first_preview(engine, PromptInput("a yellow sun"),
                                           OmniDiffusionSamplingParams(num_inference_steps=10, seed=1, partial_images=2,
                                                                       **SIZE))
            joined = await engine.generate(*edit)
            await running
            alone = await engine.generate(*edit)
        finally:
            await engine.shutdown()
        return joined, alone

    joined, alone = asyncio.run(run())
    assert max_pixel_difference(joined.images[0], alone.images[0]) <= 1


async def _a_fault_beside_running_requests(inject_fault):
    engine = await started_engine(model="tiny/z-image", scheduling="continuous", warm_up=False,
                                  parallel_config=DiffusionParallelConfig(tensor_parallel_size=2))
    requests = [(PromptInput("a red fox"), OmniDiffusionSamplingParams(num_inference_steps=8, seed=1, partial_images=2,
                                                                        **SIZE)),
                (PromptInput("a blue whale"), OmniDiffusionSamplingParams(num_inference_steps=6, seed=2, **SIZE))]
    try:
        alone = [await engine.generate(*request) for request in requests]
        first = await _first_preview(engine, *requests[0])
        second = asyncio.ensure_future(engine.generate(*requests[1]))
        inject_fault(1)  # the follower raises in its next DiT forward, whoever's it is
        together = [await first, await second]
        restarts = engine.metrics.worker_restarts._value.get()
        assert not os.path.exists(FAULT_FILE), "the fault never happened: nothing was interrupted"
    finally:
        await engine.shutdown()
    return alone, together, restarts


def test_requests_interrupted_by_a_rank_fault_run_again_alone(inject_fault):
    """A fault stops every running call's collectives; none of them was the cause for sure, so each
    runs again alone (and a request that caused it would fail there by itself)."""
    alone, together, restarts = asyncio.run(_a_fault_beside_running_requests(inject_fault))
    assert restarts == 0
    for joined, single in zip(together, alone):
        assert max_pixel_difference(joined.images[0], single.images[0]) <= 1


async def _adapters_while_running(paths: dict):
    engine = await started_engine(model="tiny/z-image", scheduling="continuous", warm_up=False,
                                  lora_modules={name: str(path) for name, path in paths.items()},
                                  parallel_config=DiffusionParallelConfig(tensor_parallel_size=2))

    def styled(name: str | None, seed: int, steps: int = 5, **extra) -> OmniDiffusionSamplingParams:
        loras = [LoraAdapter(name, 1.0)] if name else None
        return OmniDiffusionSamplingParams(num_inference_steps=steps, seed=seed, loras=loras, **SIZE, **extra)

    requests = [(PromptInput("a red fox"), styled("a", 1, steps=8, partial_images=2)),
                (PromptInput("a red cat"), styled("a", 2)), (PromptInput("a red cow"), styled("b", 3)),
                (PromptInput("a red hen"), styled(None, 4))]
    try:
        alone = [await engine.generate(*request) for request in requests]
        first = await _first_preview(engine, *requests[0])
        others = await asyncio.gather(*(engine.generate(*request) for request in requests[1:]))
        together = [await first, *others]
    finally:
        await engine.shutdown()
    return alone, together


def test_requests_with_other_adapters_take_turns_and_keep_their_images(adapters):
    """At TP=2: a request with the running one's adapter joins it; one with another adapter (or none)
    waits until the running ones finish. Every image equals its image alone."""
    alone, together = asyncio.run(_adapters_while_running(adapters("z-image")))
    for joined, single in zip(together, alone):
        assert max_pixel_difference(joined.images[0], single.images[0]) <= 1
