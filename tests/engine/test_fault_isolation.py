"""A request fails alone: an error on any rank, in any layout, fails only its batch, every rank stays
in step for the next one (no restart), and the others of a failed batch are run again without it."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from engine import GenerationError, OmniDiffusionSamplingParams, PromptInput
from tests.engine.test_batching import started_engine
from tests.helpers import max_pixel_difference

LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "ulysses2": dict(ulysses_degree=2),
    "cfg2": dict(cfg_parallel_size=2),
}
LONG_PROMPT = " ".join(["a small yellow triangle at the top left on a purple background"] * 25)  # 300 tokens


def params(seed: int) -> OmniDiffusionSamplingParams:
    # guidance on: with CFG parallel every rank runs a part of each DiT call
    return OmniDiffusionSamplingParams(num_inference_steps=2, height=64, width=64, seed=seed, guidance_scale=2.0)


async def _faults_and_batches(layout: dict, inject_fault) -> dict:
    from engine import DiffusionParallelConfig

    engine = await started_engine(model="tiny/z-image", parallel_config=DiffusionParallelConfig(**layout),
                                  warm_up=False)
    try:
        pids = engine._group.pids
        prompts = ["a red fox", LONG_PROMPT, "a green frog"]
        alone = [await engine.generate(PromptInput(p), params(10 + i)) for i, p in enumerate(prompts)]
        # a fault on the last rank (a follower), inside its DiT forward, fails the request's batch ...
        inject_fault(len(pids) - 1)
        with pytest.raises(GenerationError, match=f"rank {len(pids) - 1}: InjectedFault"):
            await engine.generate(PromptInput("a red fox"), params(10))
        after_fault = await engine.generate(PromptInput("a red fox"), params(10))  # ... and only that batch
        # a batch whose first request keeps failing: it alone gets the error, the others their images
        inject_fault(len(pids) - 1, times=2)
        together = await asyncio.gather(*(engine.generate(PromptInput(p), params(10 + i))
                                          for i, p in enumerate(prompts)), return_exceptions=True)
        # an image-to-image edit asked at another size than its input's runs on the resized input
        edit = await engine.generate(PromptInput("a cat", images=[Image.new("RGB", (128, 128), (200, 30, 30))]),
                                     OmniDiffusionSamplingParams(num_inference_steps=2, height=64, width=64, seed=1))
        return dict(alone=alone, after_fault=after_fault, together=together, edit=edit, pids=pids,
                    pids_after=engine._group.pids, restarts=engine.metrics.worker_restarts._value.get())
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_a_fault_on_a_follower_fails_only_its_batch(layout, inject_fault):
    seen = asyncio.run(_faults_and_batches(LAYOUTS[layout], inject_fault))
    assert seen["pids_after"] == seen["pids"] and seen["restarts"] == 0
    alone, together = seen["alone"], seen["together"]
    assert max_pixel_difference(seen["after_fault"].images[0], alone[0].images[0]) <= 1
    assert isinstance(together[0], GenerationError) and "InjectedFault" in str(together[0])
    for batched, single in zip(together[1:], alone[1:]):
        assert max_pixel_difference(batched.images[0], single.images[0]) <= 1
    # the 300-token prompt was served, truncated to what the model reads, and said so
    assert alone[1].warnings and "truncated" in alone[1].warnings[0]
    assert seen["edit"].images[0].size == (64, 64)
