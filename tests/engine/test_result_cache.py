"""Exact repeats (engine.outputs.ResultCache): a request that names its seed and repeats an earlier
one exactly is answered without the ranks; any other request runs."""

from __future__ import annotations

import asyncio

from PIL import ImageChops

from engine import EngineConfig, OmniDiffusionSamplingParams, PromptInput
from server.cli import build_serve_parser
from tests.engine.test_batching import started_engine


def params(**values) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(**{"num_inference_steps": 2, "height": 64, "width": 64, **values})


async def _requests():
    engine = await started_engine(model="tiny/z-image", warm_up=False,
                                  result_cache_bytes=EngineConfig().result_cache_bytes)  # the default
    try:
        def count(name: str) -> float:
            return engine.metrics.registry.get_sample_value(f"ditserve_{name}_total")

        first = await engine.generate(PromptInput("a red fox"), params(seed=3))
        made = count("images_generated")
        again = await engine.generate(PromptInput("a red fox"), params(seed=3))
        assert count("images_generated") == made and count("result_cache_hits") == 1
        others = [await engine.generate(PromptInput(prompt), sampling) for prompt, sampling in (
            ("a red fox", params(seed=4)), ("a red fox", params(seed=3, num_inference_steps=3)),
            ("a red fox", params(seed=3, partial_images=1)), ("a blue fox", params(seed=3)),
            ("a red fox", params()), ("a red fox", params()))]
        assert count("images_generated") == made + len(others) and count("result_cache_hits") == 1
        return first, again, others
    finally:
        await engine.shutdown()


def test_a_seeded_repeat_is_answered_from_memory_and_nothing_else_is():
    first, again, others = asyncio.run(_requests())
    assert again.timings["result_cache_hit"] == 1 and "result_cache_hit" not in first.timings
    assert again.request_id != first.request_id and again.seed == first.seed == 3
    assert ImageChops.difference(again.images[0], first.images[0]).getbbox() is None
    assert all("result_cache_hit" not in other.timings for other in others)
    unseeded = others[-2:]  # no seed: a new picture each time
    assert unseeded[0].seed != unseeded[1].seed


def test_the_result_cache_can_be_turned_off():
    assert build_serve_parser().parse_args(["tiny/z-image", "--no-result-cache"]).result_cache_bytes == 0
    assert build_serve_parser().parse_args(["tiny/z-image"]).result_cache_bytes == EngineConfig().result_cache_bytes
