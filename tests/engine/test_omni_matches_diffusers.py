"""Omni at TP=1 and TP=2 (worker processes, engine path) equals a plain diffusers call, same seed."""

from __future__ import annotations

import pytest

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from tests.helpers import (
    FAMILIES,
    REFERENCE_PROMPT,
    REFERENCE_SEED,
    REFERENCE_STEPS,
    condition_image,
    max_pixel_difference,
    reference_image,
)


@pytest.mark.parametrize("tensor_parallel_size", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_omni_image_equals_plain_diffusers(tiny_dir, family, tensor_parallel_size):
    height, width = 64, 96
    prompt = {"prompt": REFERENCE_PROMPT}
    if family == "qwen-image-edit":
        prompt["multi_modal_data"] = {"image": condition_image()}
    parallel = DiffusionParallelConfig(tensor_parallel_size=tensor_parallel_size)
    with Omni(model=f"tiny/{family}", parallel_config=parallel) as omni:
        params = OmniDiffusionSamplingParams(
            num_inference_steps=REFERENCE_STEPS, height=height, width=width, seed=REFERENCE_SEED)
        output = omni.generate(prompt, params)[0]
    image = output.images[0]
    assert output.seed == REFERENCE_SEED
    assert image.size == (width, height)
    assert max_pixel_difference(image, reference_image(tiny_dir(family), family, height, width)) <= 1
