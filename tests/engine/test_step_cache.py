"""Step caching (workers/parallel/step_cache.py): it really skips, it is reported, and no layout
changes the picture or the count of cached steps; `cache: "off"` is the uncached picture."""

from __future__ import annotations

import pytest

from configs import CacheSettings, OmniDiffusionSamplingParams
from engine import DiffusionParallelConfig, InvalidRequestError, Omni
from tests.helpers import FAMILIES, max_pixel_difference, reference_params, reference_prompt

STEPS = 7
# A threshold no relative change of these random models reaches: after the two warm-up calls every
# call may skip, three in a row at most, so calls 2-4 skip, 5 computes, 6 skips: 4 cached steps.
FBC = {"cache_backend": "first_block_cache", "cache_config": {"threshold": 10.0, "warmup_steps": 2,
                                                              "max_cached_steps": 3}}
TAYLORSEER = {"cache_backend": "taylorseer", "cache_config": {"cache_interval": 3, "disable_cache_before_step": 2}}
# MagCache with a ratio of one at every step: no error accumulates, so after the retained first step
# (0.2 of 7, rounded) every call may skip, three in a row at most: 1-3 skip, 4 computes, 5-6 skip.
MAGCACHE = {"cache_backend": "magcache", "cache_config": {"mag_ratios": [1.0], "retention_ratio": 0.2}}
LAYOUTS = {"tp2": (2, 1, 1), "usp2": (1, 2, 1), "cfg2": (1, 1, 2), "tp2xusp2": (2, 2, 1)}
# Every kind of block stack and guidance: Z-Image (one stack, one branch), Qwen-Image (cond and
# uncond as separate calls; the edit families share its transformer), FLUX.1 (two stacks, true CFG),
# SD3 (both branches as rows of one call). CFG=2 where a family runs two branches; the hybrid for
# one family per CFG kind.
CASES = [(family, layout) for family in ("z-image", "qwen-image", "flux", "sd3") for layout in LAYOUTS
         if not (family == "z-image" and layout == "cfg2")
         and not (layout == "tp2xusp2" and family not in ("sd3", "qwen-image"))]


def params(family: str, **values) -> OmniDiffusionSamplingParams:
    return reference_params(family, num_inference_steps=STEPS, height=64, width=96, **values)


def generate(family: str, layout=(1, 1, 1), sampling: OmniDiffusionSamplingParams | None = None, **options):
    with Omni(model=f"tiny/{family}", parallel_config=DiffusionParallelConfig(*layout), **options) as omni:
        return omni.generate(reference_prompt(family), sampling or params(family))[0]


@pytest.fixture(scope="module")
def cached_at_tp1():
    """(family, backend options or None) -> that output at TP=1, each made once."""
    made = {}

    def get(family: str, backend: dict | None = None):
        key = (family, str(backend))
        if key not in made:
            made[key] = generate(family, **(backend or {}))
        return made[key]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_each_backend_skips_steps_and_says_how_many(family, cached_at_tp1):
    plain, first_block, taylorseer = (cached_at_tp1(family, backend) for backend in (None, FBC, TAYLORSEER))
    assert "cached_steps" not in plain.timings
    assert first_block.timings["cached_steps"] == 4
    assert taylorseer.timings["cached_steps"] == 3  # calls 3, 5 and 6 predicted (computed: 0, 1, 2, 4)
    for cached in (first_block, taylorseer):
        assert cached.images[0].size == plain.images[0].size
        assert max_pixel_difference(cached.images[0], plain.images[0]) > 0  # the cache really skipped


@pytest.mark.parametrize("family,layout", CASES)
def test_every_layout_caches_the_same_steps_and_draws_the_same_picture(family, layout, cached_at_tp1):
    expected = cached_at_tp1(family, FBC)
    output = generate(family, LAYOUTS[layout], **FBC)
    assert output.timings["cached_steps"] == expected.timings["cached_steps"]
    assert max_pixel_difference(output.images[0], expected.images[0]) <= 1


@pytest.mark.parametrize("layout", ["tp2", "usp2"])
def test_taylorseer_keeps_the_picture_across_layouts(layout, cached_at_tp1):
    expected = cached_at_tp1("qwen-image", TAYLORSEER)
    output = generate("qwen-image", LAYOUTS[layout], **TAYLORSEER)
    assert output.timings["cached_steps"] == expected.timings["cached_steps"]
    assert max_pixel_difference(output.images[0], expected.images[0]) <= 1


@pytest.mark.parametrize("family", ["z-image", "flux", "sd3"])
def test_magcache_skips_the_whole_stack_by_its_ratios(family, cached_at_tp1):
    plain, magcache = cached_at_tp1(family), cached_at_tp1(family, MAGCACHE)
    assert magcache.timings["cached_steps"] == 5
    assert max_pixel_difference(magcache.images[0], plain.images[0]) > 0


@pytest.mark.parametrize("family,layout", [("flux", "usp2"), ("sd3", "cfg2")])
def test_magcache_keeps_the_picture_across_layouts(family, layout, cached_at_tp1):
    expected = cached_at_tp1(family, MAGCACHE)
    output = generate(family, LAYOUTS[layout], **MAGCACHE)
    assert output.timings["cached_steps"] == expected.timings["cached_steps"]
    assert max_pixel_difference(output.images[0], expected.images[0]) <= 1


def test_a_request_may_turn_caching_off_or_set_its_own_threshold(cached_at_tp1):
    plain, first_block = cached_at_tp1("sd3"), cached_at_tp1("sd3", FBC)
    with Omni(model="tiny/sd3", **FBC) as omni:
        off = omni.generate(reference_prompt("sd3"), params("sd3", cache="off"))[0]
        strict = omni.generate(reference_prompt("sd3"), params("sd3", cache_threshold=1e-9))[0]
        again = omni.generate(reference_prompt("sd3"), params("sd3"))[0]
    assert max_pixel_difference(off.images[0], plain.images[0]) == 0 and "cached_steps" not in off.timings
    assert strict.timings["cached_steps"] == 0 and max_pixel_difference(strict.images[0], plain.images[0]) == 0
    assert again.timings["cached_steps"] == 4  # no state carried over from the requests before
    assert max_pixel_difference(again.images[0], first_block.images[0]) == 0


def test_settings_are_checked_before_anything_starts():
    with pytest.raises(ValueError, match="'warm_up_steps'"):
        CacheSettings.of("first_block_cache", {"warm_up_steps": 2})
    with pytest.raises(ValueError, match="cache backend 'teacache' is not known"):
        Omni(model="tiny/z-image", cache_backend="teacache")
    with pytest.raises(ValueError, match="calibrate"):  # MagCache on a model whose ratios are not known
        Omni(model="tiny/z-image", cache_backend="magcache")
    assert CacheSettings.of("magcache", {}, "black-forest-labs/FLUX.1-dev").mag_ratios[:2] == (1.0, 1.21094)
    with Omni(model="tiny/z-image", **TAYLORSEER) as omni, pytest.raises(InvalidRequestError) as error:
        omni.generate("a cat", params("z-image", cache_threshold=0.2))
    assert error.value.param == "cache_threshold"
