"""The judge of `builtin/shapes` reads drawn scenes back exactly, and blurred ones almost always."""

from __future__ import annotations

import numpy as np

from configs import load_builtin_models
from tools.shapes.judge import judge, score
from tools.shapes.scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, all_scenes, draw, held_out_triples


def _box_blur(image: np.ndarray, size: int) -> np.ndarray:
    pad = size // 2
    padded = np.pad(image.astype(np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    height, width = image.shape[:2]
    return sum(padded[y : y + height, x : x + width] for y in range(size) for x in range(size)) / size**2


def _all_right(scene: Scene, image: np.ndarray) -> bool:
    verdict = score(scene, judge(image))
    return verdict.background and verdict.colour_and_position and verdict.shape


def test_judge_reads_every_kind_of_drawn_scene():
    rng = np.random.default_rng(0)
    scenes = all_scenes()
    picks = [scenes[i] for i in rng.choice(len(scenes), 120, replace=False)]
    # every shape, colour, position and size is among them
    assert {s.shape for s in picks} == {"circle", "square", "triangle"} and len({s.colour for s in picks}) == 8
    assert len({s.position for s in picks}) == 9 and {s.size for s in picks} == {"small", "large"}
    assert all(_all_right(scene, draw(scene, rng)) for scene in picks)


def test_judge_tolerates_blur_and_noise_like_a_decoder_gives():
    rng = np.random.default_rng(1)
    scenes = all_scenes()
    picks = [scenes[i] for i in rng.choice(len(scenes), 60, replace=False)]
    blurred = [
        np.clip(_box_blur(draw(scene, rng), 5) + rng.normal(0, 8, (128, 128, 3)), 0, 255).astype(np.uint8)
        for scene in picks
    ]
    right = sum(_all_right(scene, image) for scene, image in zip(picks, blurred))
    assert right >= 57, f"{right}/60 blurred scenes read right"


def test_judge_finds_no_shape_on_a_plain_background_and_never_credits_noise():
    plain = np.full((128, 128, 3), COLOURS["blue"], dtype=np.uint8)
    verdict = judge(plain)
    assert verdict.background == "blue" and verdict.colour is None and verdict.shape is None
    noise = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    scene = Scene("circle", "red", "blue", "centre", "large")
    assert not _all_right(scene, noise)


def test_held_out_combinations_are_never_training_scenes():
    held_out = held_out_triples()
    assert len(held_out) == 24
    training = {(s.colour, s.shape, s.position) for s in all_scenes(exclude=held_out)}
    assert not training & held_out and len(training) == 8 * 3 * 9 - 24


def test_the_vocabulary_the_playground_offers_is_the_one_the_model_was_trained_on():
    vocabulary = load_builtin_models()["shapes"].vocabulary
    trained = {scene.caption() for scene in all_scenes()}
    assert set(vocabulary["colour"]) == set(COLOURS) and set(vocabulary["shape"]) == set(SHAPES)
    assert set(vocabulary["size"]) == set(SIZES) and len(vocabulary["position"]) == len(POSITIONS)
    assert vocabulary["background"] == vocabulary["colour"]
    template = load_builtin_models()["shapes"].prompt_template
    for position in vocabulary["position"]:
        caption = template.format(size=vocabulary["size"][0], colour="red", shape="circle", position=position,
                                  background="black")
        assert caption in trained, caption
    assert load_builtin_models()["shapes"].example_prompt in trained
