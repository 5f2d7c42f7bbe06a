"""Omni at TP=1, 2 and 4 (worker processes, engine path) equals a plain diffusers call, same seed."""

from __future__ import annotations

import pytest

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from tests.helpers import (
    FAMILIES,
    REFERENCE_PROMPT,
    REFERENCE_SEED,
    REFERENCE_STEPS,
    condition_images,
    max_pixel_difference,
    reference_image,
)

# The plus family shares its transformer, encoder and plans with qwen-image-edit (tested at TP=4)
# and costs two ~1 MP VAE encodes per run, so it runs at TP=1 and 2 only.
CASES = [(family, size) for family in FAMILIES for size in (1, 2, 4)
         if not (family == "qwen-image-edit-plus" and size == 4)]


@pytest.mark.parametrize("family,tensor_parallel_size", CASES)
def test_omni_image_equals_plain_diffusers(tiny_dir, family, tensor_parallel_size):
    height, width = 64, 96
    prompt = {"prompt": REFERENCE_PROMPT}
    if condition_images(family):
        prompt["multi_modal_data"] = {"image": condition_images(family)}
    parallel = DiffusionParallelConfig(tensor_parallel_size=tensor_parallel_size)
    with Omni(model=f"tiny/{family}", parallel_config=parallel) as omni:
        params = OmniDiffusionSamplingParams(
            num_inference_steps=REFERENCE_STEPS, height=height, width=width, seed=REFERENCE_SEED)
        output = omni.generate(prompt, params)[0]
    image = output.images[0]
    assert output.seed == REFERENCE_SEED
    assert image.size == (width, height)
    assert max_pixel_difference(image, reference_image(tiny_dir(family), family, height, width)) <= 1
