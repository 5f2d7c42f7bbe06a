"""Batching: which requests share a pipeline call, and that sharing one changes no image."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from configs import SamplingParams
from engine import AsyncEngine, EngineConfig, OmniDiffusionSamplingParams, OmniRequestOutput, PromptInput
from engine.scheduler import take_batch
from tests.helpers import max_pixel_difference
from workers import GenerationRequest


@dataclasses.dataclass
class Item:
    request: GenerationRequest
    alone: bool = False


def item(name: str, steps: int = 4, n: int = 1, side: int = 64, images=()) -> Item:
    sampling = SamplingParams(num_inference_steps=steps, num_outputs_per_prompt=n, height=side, width=side)
    return Item(GenerationRequest(request_id=name, prompt=name, seed=1, sampling=sampling, images=list(images)))


def names(batch) -> list[str]:
    return [i.request.request_id for i in batch]


def test_the_oldest_request_leads_and_compatible_ones_join_in_order():
    waiting = [item("a"), item("b", steps=8), item("c"), item("d", side=128), item("e")]
    assert names(take_batch(waiting, max_images=8)) == ["a", "c", "e"]
    assert names(take_batch(waiting[1:], max_images=8)) == ["b"]  # incompatible ones still get their turn


def test_batches_stop_at_max_images_and_an_oversize_request_runs_alone():
    waiting = [item("a", n=2), item("b", n=2), item("c", n=2)]
    assert names(take_batch(waiting, max_images=4)) == ["a", "b"]
    assert names(take_batch([item("big", n=6), item("x")], max_images=4)) == ["big"]
    assert names(take_batch([item("a"), item("b")], max_images=1)) == ["a"]


def test_requests_that_cache_steps_never_share_a_call():
    """A skip decision is one per DiT call: a caching request's picture must not depend on its company."""
    waiting = [item("a"), item("b")]
    for entry in waiting:
        entry.request.sampling = dataclasses.replace(entry.request.sampling, cache="on")
    assert names(take_batch(waiting, max_images=8)) == ["a"]
    assert names(take_batch([item("c"), item("d")], max_images=8)) == ["c", "d"]  # "off" batch as before


def test_requests_with_input_images_never_share_a_call():
    from PIL import Image

    picture = Image.new("RGB", (8, 8))
    waiting = [item("a", images=[picture]), item("b", images=[picture])]
    assert names(take_batch(waiting, max_images=8)) == ["a"]


async def started_engine(**config) -> AsyncEngine:
    """A loaded AsyncEngine without the result cache (unless `config` sizes it): a test that sends
    one request twice means to run it twice (tests/engine/test_result_cache.py tests the cache)."""
    engine = AsyncEngine(EngineConfig(**{"result_cache_bytes": 0, **config}))
    loaded = asyncio.Event()
    await engine.start(on_loaded=loaded.set)
    await loaded.wait()
    assert engine.healthy, engine.failure
    return engine


async def _batched_then_alone(model: str, prompts: list[tuple[str, str | None, int]], steps: int = 2, **config):
    """Images of the prompts run concurrently (one batch where they may share one) and then one by one."""
    engine = await started_engine(model=model, max_batch_size=8, warm_up=False, **config)
    try:
        def params(seed):
            return OmniDiffusionSamplingParams(num_inference_steps=steps, height=64, width=64, seed=seed)

        together = await asyncio.gather(*(
            engine.generate(PromptInput(prompt, negative), params(seed)) for prompt, negative, seed in prompts))
        alone = [await engine.generate(PromptInput(prompt, negative), params(seed))
                 for prompt, negative, seed in prompts]
    finally:
        await engine.shutdown()
    return together, alone


@pytest.mark.parametrize("family", ["z-image", "qwen-image"])
def test_a_batched_request_gets_exactly_its_own_image(family):
    prompts = [("a red fox", "blurry", 10), ("a whale in a very long and detailed ocean scene", "ugly", 11),
               ("sky", "dark", 12), ("a green frog on a leaf", "noise", 13)]
    together, alone = asyncio.run(_batched_then_alone(f"tiny/{family}", prompts))
    assert [o.batch_images for o in together] == [4] * 4
    assert [o.batch_images for o in alone] == [1] * 4
    for (prompt, _, seed), batched, single in zip(prompts, together, alone):
        assert batched.prompt == prompt and batched.seed == seed
        assert max_pixel_difference(batched.images[0], single.images[0]) <= 1
    assert max_pixel_difference(together[0].images[0], together[1].images[0]) > 10


def test_a_caching_request_keeps_its_picture_and_cached_steps_whoever_else_waits():
    prompts = [("a red fox", None, 10), ("sky", None, 11), ("a green frog on a leaf", None, 12), ("a whale", None, 13)]
    # every call may skip after two computed ones, three in a row at most: 3 of 5 steps cached
    together, alone = asyncio.run(_batched_then_alone(
        "tiny/z-image", prompts, steps=5, cache_backend="first_block_cache",
        cache_config={"threshold": 10.0, "warmup_steps": 2, "max_cached_steps": 3}))
    assert [o.batch_images for o in together + alone] == [1] * 8  # a skip decision is one per call
    for batched, single in zip(together, alone):
        assert batched.timings["cached_steps"] == single.timings["cached_steps"] == 3
        assert max_pixel_difference(batched.images[0], single.images[0]) <= 1


# The slow request is held inside its first step (a test hook, released by the test) until its
# timeout has passed: no race with the machine's speed. The quick request gets the same timeout,
# far more than one 64x64 step needs even on a loaded machine.
SLOW = OmniDiffusionSamplingParams(num_inference_steps=200, height=128, width=128, num_outputs_per_prompt=2)
TIMEOUT_S = 5.0


async def _timed_out_then_quick(holds) -> tuple[float, OmniRequestOutput]:
    engine = await started_engine(model="tiny/z-image", request_timeout_s=TIMEOUT_S)
    try:
        holds.arm(1)
        with pytest.raises(asyncio.TimeoutError):
            await engine.generate(PromptInput("slow"), SLOW)
        assert holds.held() == 1  # it timed out inside its step, not in the queue
        holds.release()
        started = asyncio.get_running_loop().time()
        quick = await engine.generate(PromptInput("quick"), OmniDiffusionSamplingParams(
            num_inference_steps=1, height=64, width=64))
        return asyncio.get_running_loop().time() - started, quick
    finally:
        await engine.shutdown()


def test_a_timed_out_request_stops_at_the_next_step_and_frees_the_worker(holds):
    waited, quick = asyncio.run(_timed_out_then_quick(holds))
    # Had the slow request kept the worker (199 steps left), the quick one would have timed out behind it.
    assert quick.images[0].size == (64, 64)
    assert waited < TIMEOUT_S and quick.timings["queue_s"] < TIMEOUT_S


def test_requests_share_a_call_only_with_the_same_adapters_and_scales():
    def with_loras(name: str, loras) -> Item:
        request = item(name).request
        return Item(dataclasses.replace(request, loras=loras))

    waiting = [with_loras("a", (("x", 1.0),)), with_loras("b", ()), with_loras("c", (("x", 0.5),)),
               with_loras("d", (("x", 1.0),))]
    assert names(take_batch(waiting, max_images=8)) == ["a", "d"]
