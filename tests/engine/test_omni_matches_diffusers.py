"""Omni at TP=1 and TP=2 (worker processes, engine path) equals a plain diffusers call, same seed."""

from __future__ import annotations

import pytest
import torch

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from tests.conftest import FAMILIES, condition_image, load_plain_pipeline, max_pixel_difference

PROMPT = "a cat reading a book"
SEED = 1234
STEPS = 4


def reference_image(path, family: str, height: int, width: int):
    """The same generation written out by hand against diffusers' own API."""
    pipeline = load_plain_pipeline(path)
    arguments = dict(
        prompt=PROMPT, height=height, width=width, num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(SEED),
    )
    if family in ("qwen-image", "qwen-image-edit"):
        arguments.update(negative_prompt=" ", true_cfg_scale=4.0)
    if family == "qwen-image-edit":
        arguments["image"] = condition_image()
    if family == "z-image":
        arguments["guidance_scale"] = 0.0
    if family == "flux":
        arguments["guidance_scale"] = 3.5
    if family == "sd3":
        arguments["guidance_scale"] = 7.0
    with torch.inference_mode():
        return pipeline(**arguments).images[0]


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_omni_image_equals_plain_diffusers(tiny_dir, family, tensor_parallel_size):
    height, width = 64, 96
    prompt = {"prompt": PROMPT}
    if family == "qwen-image-edit":
        prompt["multi_modal_data"] = {"image": condition_image()}
    with Omni(model=f"tiny/{family}", parallel_config=DiffusionParallelConfig(tensor_parallel_size=tensor_parallel_size)) as omni:
        params = OmniDiffusionSamplingParams(num_inference_steps=STEPS, height=height, width=width, seed=SEED)
        output = omni.generate(prompt, params)[0]
    image = output.images[0]
    assert output.seed == SEED
    assert image.size == (width, height)
    assert max_pixel_difference(image, reference_image(tiny_dir(family), family, height, width)) <= 1
