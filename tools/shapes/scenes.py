"""Procedural scenes for `builtin/shapes`: one flat shape on a flat background, and its caption.

Everything a scene can be is listed here once; the trainer draws from it and the judge reads the
same palette, positions and size classes back out of generated pixels.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 128

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Position name -> (column, row) of the 3x3 grid cell the shape's centre sits in.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
# Half the shape's side in pixels at 128x128.
SIZES: dict[str, int] = {"small": 12, "large": 24}
CELL_CENTRES = (32, 64, 96)
JITTER = 3

_POSITION_PHRASES = {
    "centre": ("in the centre", "in the center"),
    "left": ("on the left",), "right": ("on the right",),
    "top": ("at the top",), "bottom": ("at the bottom",),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: str

    def caption(self, with_size: bool = True, with_position: bool = True, variant: int = 0) -> str:
        """Plain English, e.g. "a small yellow triangle at the top left on a purple background"."""
        words = ([self.size] if with_size else []) + [self.colour, self.shape]
        if with_position:
            phrases = _POSITION_PHRASES.get(self.position, (f"at the {self.position}",))
            words.append(phrases[variant % len(phrases)])
        return " ".join([_article(words[0]), *words, "on", _article(self.background), self.background, "background"])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def held_out_triples(count: int = 24, seed: int = 7) -> frozenset[tuple[str, str, str]]:
    """(colour, shape, position) combinations never drawn in training: the judge's test set."""
    triples = sorted(itertools.product(COLOURS, SHAPES, POSITIONS))
    return frozenset(random.Random(seed).sample(triples, count))


def all_scenes(exclude: frozenset[tuple[str, str, str]] = frozenset()) -> list[Scene]:
    return [
        Scene(shape, colour, background, position, size)
        for colour, shape, position in itertools.product(COLOURS, SHAPES, POSITIONS)
        if (colour, shape, position) not in exclude
        for background in COLOURS
        if background != colour
        for size in SIZES
    ]


def draw(scene: Scene, rng: np.random.Generator, supersample: int = 2) -> np.ndarray:
    """The scene as uint8 RGB (IMAGE_SIZE, IMAGE_SIZE, 3), with a few pixels of jitter in position
    and size, antialiased by drawing at `supersample` times the size and averaging."""
    side = IMAGE_SIZE * supersample
    column, row = POSITIONS[scene.position]
    cx = (CELL_CENTRES[column] + rng.uniform(-JITTER, JITTER)) * supersample
    cy = (CELL_CENTRES[row] + rng.uniform(-JITTER, JITTER)) * supersample
    half = (SIZES[scene.size] + rng.uniform(-1.5, 1.5)) * supersample
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    if scene.shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    elif scene.shape == "square":
        inside = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    else:  # an upright isosceles triangle in the square's box
        depth = (ys - (cy - half)) / (2 * half)
        inside = (depth >= 0) & (depth <= 1) & (np.abs(xs - cx) <= depth * half)
    coverage = inside.reshape(IMAGE_SIZE, supersample, IMAGE_SIZE, supersample).mean(axis=(1, 3))[..., None]
    foreground = np.array(COLOURS[scene.colour], dtype=np.float32)
    background = np.array(COLOURS[scene.background], dtype=np.float32)
    return np.round(coverage * foreground + (1 - coverage) * background).astype(np.uint8)
