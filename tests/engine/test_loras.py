"""LoRA adapters through Omni (real rank processes) equal diffusers' load_lora_weights + set_adapters.

Every family, at TP=1 and TP=2, max pixel difference <= 1 against plain diffusers, same seed.
Adapter "a" (rank 4, alpha 8 in its saved config) touches every Linear of the DiT's blocks
(column-, row- and gathered-column-parallel under TP) and, for FLUX.1 and SD3 (the pipelines that
load text-encoder LoRA), the first CLIP text encoder; "b" (rank 2, no saved config: alpha = rank)
touches the DiT only. At TP=2 the requests alternate a, base, b, a+b, a: no adapter leaks into the
next request.
"""

from __future__ import annotations

import pytest

from engine import DiffusionParallelConfig, LoraAdapter, Omni, OmniDiffusionSamplingParams
from engine.tiny_adapters import build_random_adapter
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

TEXT_ENCODER_LORA = {"flux", "sd3"}
SEQUENCES = {
    1: [(("a", 0.7),), (("a", 1.0), ("b", 1.5))],
    2: [(("a", 0.7),), (), (("b", 1.5),), (("a", 1.0), ("b", 1.5)), (("a", 0.7),)],
}
# The plus family shares qwen-image-edit's transformer and LoRA loader, and each of its runs pays
# two ~1 MP VAE encodes: one composed request at TP=2.
CASES = [(family, tp) for family in FAMILIES for tp in SEQUENCES if family != "qwen-image-edit-plus"]
CASES.append(("qwen-image-edit-plus", 2))


@pytest.fixture(scope="session")
def adapters(tmp_path_factory):
    built: dict[str, dict[str, object]] = {}

    def for_family(family: str) -> dict:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"lora-{family}")
            built[family] = {
                "a": build_random_adapter(f"tiny/{family}", folder / "a", rank=4, seed=1, alpha=8,
                                          text_encoder=family in TEXT_ENCODER_LORA),
                "b": build_random_adapter(f"tiny/{family}", folder / "b", rank=2, seed=2),
            }
        return built[family]
    return for_family


@pytest.mark.parametrize("family,tp", CASES)
def test_adapters_match_diffusers(tiny_dir, adapters, family, tp):
    height, width = 64, 96
    paths = adapters(family)
    prompt = {"prompt": REFERENCE_PROMPT}
    if condition_images(family):
        prompt["multi_modal_data"] = {"image": condition_images(family)}
    sequence = SEQUENCES[tp] if family != "qwen-image-edit-plus" else [(("a", 1.0), ("b", 1.5))]
    base = reference_image(tiny_dir(family), family, height, width)
    with Omni(model=f"tiny/{family}", parallel_config=DiffusionParallelConfig(tp),
              lora_modules={name: str(path) for name, path in paths.items()}) as omni:
        for loras in sequence:
            params = OmniDiffusionSamplingParams(
                num_inference_steps=REFERENCE_STEPS, height=height, width=width, seed=REFERENCE_SEED,
                loras=[LoraAdapter(name, scale) for name, scale in loras] or None,
                **(FLUX_TRUE_CFG if family == "flux" else {}))
            image = omni.generate(prompt, params)[0].images[0]
            expected = reference_image(tiny_dir(family), family, height, width,
                                       loras=tuple((paths[name], scale) for name, scale in loras))
            assert max_pixel_difference(image, expected) <= 1, f"{loras} at TP={tp}"
            if loras:  # the adapter really changes the image, so the comparison means something
                assert max_pixel_difference(expected, base) >= 8, f"{loras} hardly changes the image"
