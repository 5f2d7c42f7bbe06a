"""builtin/shapes, the default model: small, loadable by plain diffusers, and it draws what the
prompt says (held-out combinations, judged by tools/shapes/judge.py) at TP=1 and TP=2 alike."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from engine import DEFAULT_MODEL, DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams, resolve_model
from tests.helpers import load_plain_pipeline
from tools.shapes.judge import judge, score
from tools.shapes.scenes import COLOURS, Scene, held_out_triples

SEED = 3


def _held_out_scenes() -> list[Scene]:
    """Eight colour/shape/position combinations never drawn in training, each on the palette's
    next colour as background, small and large in turn."""
    names = list(COLOURS)
    picked = sorted(held_out_triples())[::3]
    return [
        Scene(shape, colour, names[(names.index(colour) + 1) % len(names)], position, ("small", "large")[i % 2])
        for i, (colour, shape, position) in enumerate(picked)
    ]


@pytest.fixture(scope="module")
def tp1_images() -> list[np.ndarray]:
    with Omni(parallel_config=DiffusionParallelConfig(tensor_parallel_size=1)) as omni:
        outputs = omni.generate([s.caption() for s in _held_out_scenes()], OmniDiffusionSamplingParams(seed=SEED))
    return [np.asarray(output.images[0].convert("RGB")) for output in outputs]


def test_the_default_model_is_builtin_shapes_small_and_plain_diffusers_loads_it():
    model = resolve_model(DEFAULT_MODEL)
    assert model.name == "builtin/shapes" and model.family.name == "z-image"
    assert (model.defaults.height, model.defaults.width, model.defaults.num_inference_steps) == (128, 128, 9)
    shipped = sum(path.stat().st_size for path in model.path.rglob("*") if path.is_file())
    assert shipped <= 25 * 2**20, f"{shipped / 2**20:.1f} MB"
    pipeline = diffusers.DiffusionPipeline.from_pretrained(model.path)
    assert type(pipeline) is diffusers.ZImagePipeline
    assert pipeline.transformer.config.n_heads == 6  # TP=4 splits it unevenly


def test_it_draws_held_out_prompts(tp1_images):
    """Targets of the benchmark (benchmarks/shapes_quality.py), on eight fixed prompts."""
    verdicts = [score(scene, judge(image)) for scene, image in zip(_held_out_scenes(), tp1_images)]
    assert all(image.shape == (128, 128, 3) for image in tp1_images)
    assert sum(v.background for v in verdicts) == 8
    assert sum(v.colour_and_position for v in verdicts) >= 7
    assert sum(v.shape for v in verdicts) >= 6


def test_tp2_and_plain_diffusers_draw_the_same_pixels(tp1_images):
    scenes = _held_out_scenes()
    with Omni(parallel_config=DiffusionParallelConfig(tensor_parallel_size=2)) as omni:
        outputs = omni.generate([s.caption() for s in scenes], OmniDiffusionSamplingParams(seed=SEED))
    tp2_images = [np.asarray(output.images[0].convert("RGB")) for output in outputs]
    for tp1, tp2 in zip(tp1_images, tp2_images):
        assert np.abs(tp1.astype(int) - tp2).max() <= 1  # fp32: only the order of additions differs
    assert [judge(image) for image in tp2_images] == [judge(image) for image in tp1_images]

    pipeline = load_plain_pipeline(resolve_model(DEFAULT_MODEL).path)
    with torch.inference_mode():
        plain = pipeline(scenes[0].caption(), height=128, width=128, num_inference_steps=9, guidance_scale=0.0,
                         generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert np.abs(np.asarray(plain).astype(int) - tp1_images[0]).max() <= 1
