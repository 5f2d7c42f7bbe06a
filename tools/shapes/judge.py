"""Reads a generated 128x128 scene back: background colour, and the largest non-background region's
colour, grid position and shape class. No learned model: palette distances and region statistics.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from tools.shapes.scenes import COLOURS, POSITIONS, Scene

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float32)
BORDER = 4                # pixels of the frame that are background in every scene
FOREGROUND_DISTANCE = 50  # RGB distance from the background colour that counts as "something else"
MIN_REGION = 40           # pixels; a small shape covers about 570


@dataclass(frozen=True)
class Verdict:
    background: str
    colour: str | None = None    # None: no region found
    position: str | None = None
    shape: str | None = None


@dataclass(frozen=True)
class Score:
    background: bool
    colour_and_position: bool
    shape: bool


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    distances = np.linalg.norm(pixels[:, None, :].astype(np.float32) - _PALETTE[None], axis=-1)
    return distances.argmin(axis=1)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of `mask`, as a mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, next_label = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        next_label += 1
        labels[start] = next_label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = next_label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = next_label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _grid_position(region: np.ndarray) -> str:
    ys, xs = np.nonzero(region)
    side = region.shape[0]
    # Cell centres sit at 1/4, 1/2 and 3/4 of the side; the boundaries are halfway between them.
    column = int(np.digitize(xs.mean(), [side * 3 / 8, side * 5 / 8]))
    row = int(np.digitize(ys.mean(), [side * 3 / 8, side * 5 / 8]))
    return next(name for name, cell in POSITIONS.items() if cell == (column, row))


def _shape_class(region: np.ndarray) -> str:
    """Triangle: much narrower at the top of its box than at the bottom. Square: fills its box
    (circle: pi/4 of it)."""
    ys, xs = np.nonzero(region)
    box = region[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    widths = box.sum(axis=1)
    quarter = max(1, len(widths) // 4)
    if widths[:quarter].mean() < 0.6 * widths[-quarter:].mean():
        return "triangle"
    return "square" if box.mean() > 0.85 else "circle"


def judge(image: np.ndarray) -> Verdict:
    """`image`: uint8 RGB (H, W, 3)."""
    frame = np.ones(image.shape[:2], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    border = image[frame]
    border_colours = _nearest_colour(border)
    background_index = np.bincount(border_colours, minlength=len(_PALETTE)).argmax()
    measured_background = np.median(border[border_colours == background_index], axis=0)
    distance = np.linalg.norm(image.astype(np.float32) - measured_background, axis=-1)
    region = _largest_region(distance > FOREGROUND_DISTANCE)
    background = _PALETTE_NAMES[background_index]
    if region.sum() < MIN_REGION:
        return Verdict(background)
    labels = _nearest_colour(image[region])
    colour_index = np.bincount(labels, minlength=len(_PALETTE)).argmax()
    # The shape's outline at half contrast, where blur moves it least: pixels nearer the shape's
    # measured colour than the background's.
    measured_colour = np.median(image[region][labels == colour_index], axis=0)
    nearer_shape = np.linalg.norm(image.astype(np.float32) - measured_colour, axis=-1) < distance
    outline = _largest_region(nearer_shape)
    return Verdict(
        background, _PALETTE_NAMES[colour_index], _grid_position(outline), _shape_class(outline)
    )


def score(scene: Scene, verdict: Verdict) -> Score:
    return Score(
        background=verdict.background == scene.background,
        colour_and_position=(verdict.colour, verdict.position) == (scene.colour, scene.position),
        shape=verdict.shape == scene.shape,
    )
