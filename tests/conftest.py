"""Shared fixtures: an isolated tiny-model cache, offline hub, and plain-diffusers references."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports the engine: spawned rank processes inherit the environment.
os.environ["DITSERVE_CACHE"] = tempfile.mkdtemp(prefix="ditserve-test-cache-")
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from engine.tiny_models import cached_tiny_model  # noqa: E402
from workers.qwen_vl_processor import Qwen2VLImageOnlyProcessor  # noqa: E402

FAMILIES = ["z-image", "qwen-image", "qwen-image-edit", "flux", "sd3"]


@pytest.fixture(scope="session")
def tiny_dir():
    """tiny_dir("flux") -> the cached tiny checkpoint folder, built once per session."""
    return lambda family: cached_tiny_model(f"tiny/{family}")


def load_plain_pipeline(path: Path) -> diffusers.DiffusionPipeline:
    """The pipeline exactly as a diffusers user would load it (plus the torchvision-free processor)."""
    extra = {}
    if (path / "processor").is_dir():
        extra["processor"] = Qwen2VLImageOnlyProcessor.from_pretrained(path / "processor")
    pipeline = diffusers.DiffusionPipeline.from_pretrained(path, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def condition_image(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A small deterministic RGB image for edit requests."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def max_pixel_difference(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size, (a.size, b.size)
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())

