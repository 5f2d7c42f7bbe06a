"""Omni under every parallel layout (worker processes, engine path) equals a plain diffusers call, same seed.

Layouts are (tensor_parallel_size, ulysses_degree, cfg_parallel_size). CFG=2 runs both guidance
branches at once for the true-CFG families (Qwen-Image*, FLUX with a negative prompt) and splits
the batched branches of SD3; Z-Image-Turbo (guidance 0) has one branch, so its CFG=2 case is the
request that runs on one CFG group. Ulysses 3 splits 4 heads 2/1/1 and text tokens unevenly.
"""

from __future__ import annotations

import pytest

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from tests.helpers import (
    FAMILIES,
    FLUX_TRUE_CFG,
    REFERENCE_PROMPT,
    REFERENCE_SEED,
    REFERENCE_STEPS,
    condition_images,
    max_pixel_difference,
    reference_image,
)

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "tp4": (4, 1, 1), "cfg2": (1, 1, 2), "usp2": (1, 2, 1),
           "usp3": (1, 3, 1), "tp2xcfg2": (2, 1, 2), "tp2xusp2": (2, 2, 1)}
# The plus family shares its transformer, encoder and plans with qwen-image-edit (tested in every
# layout) and costs two ~1 MP VAE encodes per run, so it runs in the two-rank layouts only.
CASES = [(family, name) for family in FAMILIES for name, sizes in LAYOUTS.items()
         if not (family == "qwen-image-edit-plus" and sizes[0] * sizes[1] * sizes[2] > 2 + (name == "usp3"))]


@pytest.mark.parametrize("family,layout", CASES)
def test_omni_image_equals_plain_diffusers(tiny_dir, family, layout):
    height, width = 64, 96
    prompt = {"prompt": REFERENCE_PROMPT}
    if condition_images(family):
        prompt["multi_modal_data"] = {"image": condition_images(family)}
    parallel = DiffusionParallelConfig(*LAYOUTS[layout])
    with Omni(model=f"tiny/{family}", parallel_config=parallel) as omni:
        params = OmniDiffusionSamplingParams(
            num_inference_steps=REFERENCE_STEPS, height=height, width=width, seed=REFERENCE_SEED,
            **(FLUX_TRUE_CFG if family == "flux" else {}))
        output = omni.generate(prompt, params)[0]
    image = output.images[0]
    assert output.seed == REFERENCE_SEED
    assert image.size == (width, height)
    assert max_pixel_difference(image, reference_image(tiny_dir(family), family, height, width)) <= 1
