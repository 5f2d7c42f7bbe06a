"""The Omni API on one warm worker: prompts, outputs, seeds, sizes and validation errors."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
import transformers

from engine import Omni, OmniDiffusionSamplingParams
from tests.helpers import max_pixel_difference


@pytest.fixture(scope="module")
def omni():
    with Omni(model="tiny/z-image") as instance:
        yield instance


def test_list_of_prompts_gives_one_output_each_in_order(omni):
    prompts = ["a red fox", {"prompt": "a blue whale", "negative_prompt": "blurry"}, "a green frog"]
    outputs = omni.generate(prompts, OmniDiffusionSamplingParams(num_inference_steps=2, height=64, width=64))
    assert [o.prompt for o in outputs] == ["a red fox", "a blue whale", "a green frog"]
    assert len({o.request_id for o in outputs}) == 3
    tokenizer = transformers.AutoTokenizer.from_pretrained(omni.model.path / "tokenizer")
    for output in outputs:
        uuid.UUID(output.request_id)
        assert output.images[0].size == (64, 64)
        timings = output.timings
        phases = timings["pre_denoise_s"] + timings["denoise_s"] + timings["post_denoise_s"]
        assert 0 < phases <= timings["inference_s"] <= timings["total_s"]
        assert output.usage.text_tokens == len(tokenizer(output.prompt, add_special_tokens=False).input_ids) > 0
        assert (output.usage.image_tokens, output.usage.output_tokens) == (0, (64 // 16) ** 2)
        assert output.usage.total_tokens == output.usage.text_tokens + 16


def test_unset_seed_is_chosen_and_reported_so_the_image_can_be_reproduced(omni):
    params = OmniDiffusionSamplingParams(num_inference_steps=2, height=64, width=64)
    first = omni.generate("a lighthouse", params)[0]
    again = omni.generate("a lighthouse", OmniDiffusionSamplingParams(
        num_inference_steps=2, height=64, width=64, seed=first.seed))[0]
    assert max_pixel_difference(first.images[0], again.images[0]) == 0


def test_different_seeds_give_different_images(omni):
    images = [
        omni.generate("a lighthouse", OmniDiffusionSamplingParams(
            num_inference_steps=2, height=64, width=64, seed=seed))[0].images[0]
        for seed in (1, 2)
    ]
    assert max_pixel_difference(*images) > 10


def test_family_and_tiny_defaults_fill_unset_fields(omni):
    output = omni.generate("a tiny default", OmniDiffusionSamplingParams(seed=5))[0]
    assert output.images[0].size == (128, 128)  # tiny/z-image default size


@pytest.mark.parametrize("height,width", [(64, 160), (144, 80)])
def test_asked_size_is_honoured(omni, height, width):
    params = OmniDiffusionSamplingParams(num_inference_steps=1, height=height, width=width)
    output = omni.generate("a wide view", params)[0]
    assert output.images[0].size == (width, height)


def test_num_outputs_per_prompt(omni):
    output = omni.generate("twins", OmniDiffusionSamplingParams(
        num_inference_steps=1, height=64, width=64, num_outputs_per_prompt=3))[0]
    assert len(output.images) == 3
    arrays = [np.asarray(image) for image in output.images]
    assert not np.array_equal(arrays[0], arrays[1])


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(height=100, width=64),
         "height=100 is not supported: height and width must be multiples of 16 between 64 and 2048 (for example 96)"),
        (dict(height=64, width=4096),
         "width=4096 is not supported: height and width must be multiples of 16 between 64 and 2048 "
         "(for example 2048)"),
        (dict(height=32, width=64), "height=32 is not supported"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_outputs_per_prompt=11), "num_outputs_per_prompt=11 must be between 1 and 10"),
        (dict(num_outputs_per_prompt=0), "num_outputs_per_prompt=0 must be between 1 and 10"),
        (dict(seed=-1), "seed=-1"),
    ],
)
def test_bad_sampling_values_raise_value_error_naming_what_works(omni, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        omni.generate("x", OmniDiffusionSamplingParams(**params))


def test_bad_prompts_raise_value_error(omni):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        omni.generate("   ")
    with pytest.raises(ValueError, match="sides of at least 64 pixels"):
        omni.generate({"prompt": "x", "multi_modal_data": {"image": __import__("PIL.Image").Image.new("RGB", (8, 8))}})
    with pytest.raises(ValueError, match="a mask needs the image it applies to"):
        omni.generate({"prompt": "x", "multi_modal_data": {"mask": __import__("PIL.Image").Image.new("L", (8, 8))}})
    with pytest.raises(ValueError, match="string 'prompt'"):
        omni.generate({"text": "x"})


def test_worker_still_serves_after_rejected_requests(omni):
    with pytest.raises(ValueError):
        omni.generate("x", OmniDiffusionSamplingParams(height=7))
    quick = OmniDiffusionSamplingParams(num_inference_steps=1, height=64, width=64)
    assert omni.generate("still here", quick)[0].images


def test_image_i_of_a_request_is_reproducible_alone_with_seed_plus_i(omni):
    params = dict(num_inference_steps=2, height=64, width=64)
    pair = omni.generate("twins", OmniDiffusionSamplingParams(seed=40, num_outputs_per_prompt=2, **params))[0]
    assert pair.seeds == [40, 41]
    second = omni.generate("twins", OmniDiffusionSamplingParams(seed=41, **params))[0]
    assert max_pixel_difference(pair.images[1], second.images[0]) <= 1  # batch of 2 vs 1: float rounding only


def test_keyboard_interrupt_cancels_the_running_request(omni):
    # A shell starts background jobs with SIGINT ignored; make Ctrl-C raise here as it does in a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Four 1024x1024 images for 200 steps: minutes of work, unless Ctrl-C stops them.
        long_run = OmniDiffusionSamplingParams(
            num_inference_steps=200, height=1024, width=1024, num_outputs_per_prompt=4, seed=1)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # a real Ctrl-C
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            omni.generate("a very long job", long_run)
        interrupted = time.perf_counter()
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    quick = omni.generate("next", OmniDiffusionSamplingParams(num_inference_steps=1, height=64, width=64))[0]
    # The quick request ran once the long one stopped at its next step (a step here takes well
    # under a second; the bound is ten times that even on a loaded machine), not after 200 steps.
    waited = time.perf_counter() - interrupted
    assert waited < 15.0, f"the next request took {waited:.2f} s"
    assert quick.images[0].size == (64, 64)


def test_partial_images_reach_the_callback_and_leave_the_final_images_unchanged(omni):
    params = OmniDiffusionSamplingParams(num_inference_steps=6, height=64, width=96, seed=5, num_outputs_per_prompt=2)
    plain = omni.generate(["a cat", "a dog"], params)
    partials = []
    previewed = omni.generate(["a cat", "a dog"], dataclasses.replace(params, partial_images=2),
                              on_partial=partials.append)
    assert sorted((p.prompt_index, p.image_index, p.partial_index) for p in partials) == [
        (prompt, image, partial) for prompt in (0, 1) for image in (0, 1) for partial in (0, 1)]
    assert all(p.image.size == (96, 64) for p in partials)
    for with_previews, without in zip(previewed, plain):
        for a, b in zip(with_previews.images, without.images):
            assert max_pixel_difference(a, b) == 0
