"""LoRA adapters through Omni (real rank processes) equal diffusers' load_lora_weights + set_adapters.

Every family, at TP=1 and TP=2, max pixel difference <= 1 against plain diffusers, same seed.
Adapter "a" (rank 4, alpha 8 in its saved config) touches every Linear of the DiT's blocks
(column-, row- and gathered-column-parallel under TP) and, for FLUX.1 and SD3 (the pipelines that
load text-encoder LoRA), the first CLIP text encoder; "b" (rank 2, no saved config: alpha = rank)
touches the DiT only (tests/conftest.py builds them). At TP=2 the requests alternate a, base, b,
a+b, a: no adapter leaks into the next request.
"""

from __future__ import annotations

import pytest

from engine import (
    DiffusionParallelConfig,
    InvalidRequestError,
    LoraAdapter,
    LoraLoadError,
    LoraNotFound,
    Omni,
    OmniDiffusionSamplingParams,
)
from tests.helpers import (
    FAMILIES,
    REFERENCE_PROMPT,
    REFERENCE_SEED,
    REFERENCE_STEPS,
    max_pixel_difference,
    reference_image,
    reference_params,
    reference_prompt,
)

SEQUENCES = {
    1: [(("a", 0.7),), (("a", 1.0), ("b", 1.5))],
    2: [(("a", 0.7),), (), (("b", 1.5),), (("a", 1.0), ("b", 1.5)), (("a", 0.7),)],
}
# The plus family shares qwen-image-edit's transformer and LoRA loader, and each of its runs pays
# two ~1 MP VAE encodes: one composed request at TP=2.
CASES = [(family, tp) for family in FAMILIES for tp in SEQUENCES if family != "qwen-image-edit-plus"]
CASES.append(("qwen-image-edit-plus", 2))


@pytest.mark.parametrize("family,tp", CASES)
def test_adapters_match_diffusers(tiny_dir, adapters, family, tp):
    height, width = 64, 96
    paths = adapters(family)
    sequence = SEQUENCES[tp]
    if family.startswith("qwen-image-edit"):  # ~4 s a request (1 MP VAE encodes): fewer, same coverage
        sequence = [(("a", 1.0), ("b", 1.5))] if family.endswith("plus") else SEQUENCES[1]
    base = reference_image(tiny_dir(family), family, height, width)
    with Omni(model=f"tiny/{family}", parallel_config=DiffusionParallelConfig(tp),
              lora_modules={name: str(path) for name, path in paths.items()}) as omni:
        for loras in sequence:
            params = reference_params(family, height=height, width=width,
                                      loras=[LoraAdapter(name, scale) for name, scale in loras] or None)
            image = omni.generate(reference_prompt(family), params)[0].images[0]
            expected = reference_image(tiny_dir(family), family, height, width,
                                       loras=tuple((paths[name], scale) for name, scale in loras))
            assert max_pixel_difference(image, expected) <= 1, f"{loras} at TP={tp}"
            if loras:  # the adapter really changes the image, so the comparison means something
                assert max_pixel_difference(expected, base) >= 8, f"{loras} hardly changes the image"


def _params(loras=(), **overrides) -> OmniDiffusionSamplingParams:
    values = dict(num_inference_steps=REFERENCE_STEPS, height=64, width=96, seed=REFERENCE_SEED,
                  loras=[LoraAdapter(name, scale) for name, scale in loras] or None)
    return OmniDiffusionSamplingParams(**{**values, **overrides})


def test_adapters_beyond_max_loras_are_dropped_and_read_again(tiny_dir, adapters):
    """max_loras=1: every switch drops the resident adapter and reads the other from its file."""
    paths = adapters("z-image")
    with Omni(model="tiny/z-image", parallel_config=DiffusionParallelConfig(2), max_loras=1,
              lora_modules={name: str(path) for name, path in paths.items()}) as omni:
        for name in ("a", "b", "a"):
            image = omni.generate(REFERENCE_PROMPT, _params([(name, 1.0)]))[0].images[0]
            expected = reference_image(tiny_dir("z-image"), "z-image", 64, 96, loras=((paths[name], 1.0),))
            assert max_pixel_difference(image, expected) <= 1, name
        with pytest.raises(InvalidRequestError, match="at most max_loras=1"):
            omni.generate(REFERENCE_PROMPT, _params([("a", 1.0), ("b", 1.0)]))


def test_adapter_memory_per_rank_follows_the_split(adapters):
    """At TP=2 rank 0 holds B's rows of column-parallel layers and A's columns of row-parallel
    ones, the other factor whole: (in + out/2) / (in + out) of each layer, <= 0.75 for these."""
    path = str(adapters("flux")["a"])  # DiT and text-encoder layers
    held = {}
    for tp in (1, 2):
        with Omni(model="tiny/flux", parallel_config=DiffusionParallelConfig(tp), lora_modules={"a": path}) as omni:
            held[tp] = omni.loras.adapters["a"].driver_bytes
    assert held[1] > 0
    assert 0.5 <= held[2] / held[1] <= 0.75, held


def test_bad_adapters_get_clear_errors_and_the_engine_keeps_serving(tmp_path, adapters):
    paths = adapters("z-image")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with Omni(model="tiny/z-image", max_lora_rank=3, lora_modules={"b": str(paths["b"])}) as omni:
        with pytest.raises(LoraLoadError, match="rank 4, above --max-lora-rank=3") as raised:
            omni.load_lora("a", str(paths["a"]))
        assert raised.value.code == "lora_rank_too_high"
        with pytest.raises(LoraLoadError, match="match no layer of this model") as raised:
            omni.load_lora("flux-adapter", str(adapters("flux")["b"]))
        assert "transformer_blocks.0" in str(raised.value)  # names the first unmatched layers
        with pytest.raises(LoraLoadError, match="could not read"):
            omni.load_lora("corrupt", str(corrupt))
        with pytest.raises(LoraLoadError, match="already loaded"):
            omni.load_lora("b", str(paths["b"]))
        with pytest.raises(LoraNotFound, match="'missing' is not loaded; served: \\['b'\\]"):
            omni.generate(REFERENCE_PROMPT, _params([("missing", 1.0)]))
        assert list(omni.loras.adapters) == ["b"]
        omni.unload_lora("b")
        with pytest.raises(LoraNotFound):
            omni.generate(REFERENCE_PROMPT, _params([("b", 1.0)]))
        assert omni.generate(REFERENCE_PROMPT, _params(num_inference_steps=2))[0].images[0].size == (96, 64)
