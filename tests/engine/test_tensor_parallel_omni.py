"""TP through the real engine: N rank processes over gloo, numerically equal to TP=1 and diffusers."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time

import pytest

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams, WorkerGroupDied, WorkerStartupError
from tests.helpers import max_pixel_difference, reference_image

PARAMS = OmniDiffusionSamplingParams(num_inference_steps=4, height=64, width=96, seed=1234)


def tp(n: int) -> DiffusionParallelConfig:
    return DiffusionParallelConfig(tensor_parallel_size=n)


@pytest.mark.parametrize("size", [3, 4])
def test_uneven_head_split_matches_diffusers(tiny_dir, size):
    """tiny/z-image has 6 heads: 2/2/1/1 at TP=4, 2/2/2 at TP=3."""
    with Omni(model="tiny/z-image", parallel_config=tp(size)) as omni:
        image = omni.generate("a cat reading a book", PARAMS)[0].images[0]
    assert max_pixel_difference(image, reference_image(tiny_dir("z-image"), "z-image", 64, 96)) <= 1


def test_offloaded_text_encoder_shards_and_vae_give_the_same_image(tiny_dir):
    """Each TP rank's text-encoder shard and the driver's VAE are wrapped (workers.offload) and
    loaded to their home device; the image is diffusers' (on the CPU the moves cost nothing)."""
    with Omni(model="tiny/z-image", parallel_config=tp(2), text_encoder_offload="cpu", vae_offload="cpu") as omni:
        image = omni.generate("a cat reading a book", PARAMS)[0].images[0]
    assert max_pixel_difference(image, reference_image(tiny_dir("z-image"), "z-image", 64, 96)) <= 1


def test_text_encoders_are_sharded_and_a_repeated_prompt_skips_them_on_every_rank():
    with Omni(model="tiny/flux", parallel_config=tp(2)) as omni:
        driver, follower = omni.rank_parameter_bytes()
        first, again, other = (omni.generate(prompt, PARAMS)[0] for prompt in ("a cat", "a cat", "a dog"))
    assert "prompt_cache_hits" not in first.timings and again.timings["prompt_cache_hits"] == 1
    assert "prompt_cache_hits" not in other.timings
    assert max_pixel_difference(again.images[0], first.images[0]) == 0
    assert set(follower) == {"transformer", "text_encoder", "text_encoder_2"}
    assert {"text_encoder", "text_encoder_2", "vae", "transformer"} <= set(driver) and driver["vae"] > 0
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        assert abs(driver[name] - follower[name]) < 0.1 * driver[name], name


def test_impossible_size_fails_before_any_process_starts():
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match=r"cannot split n_heads \(attention heads\)=6 over tensor_parallel_size=7"):
        Omni(model="tiny/z-image", parallel_config=tp(7))
    assert set(multiprocessing.active_children()) == before


def test_failed_load_at_tp2_leaves_no_process(tiny_dir, tmp_path):
    broken = shutil.copytree(tiny_dir("sd3"), tmp_path / "broken")
    next((broken / "transformer").glob("*.safetensors")).write_bytes(b"\0" * 64)
    before = set(multiprocessing.active_children())
    with pytest.raises(WorkerStartupError, match="failed to load the model"):
        Omni(model=str(broken), parallel_config=tp(2))
    assert set(multiprocessing.active_children()) == before


def test_dead_follower_fails_requests_promptly_and_close_cleans_up():
    omni = Omni(model="tiny/sd3", parallel_config=tp(2))
    try:
        pids = omni.rank_pids()
        os.kill(pids[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerGroupDied, match=r"rank\(s\) \[1\] exited|a rank of the worker group died"):
            omni.generate("x", PARAMS)
        assert time.monotonic() - started < 30
    finally:
        omni.close()
    assert not multiprocessing.active_children()
