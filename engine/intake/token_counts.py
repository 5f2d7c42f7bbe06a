"""What an image request reads and makes, counted as OpenAI's images `usage` counts it: text
tokens of the prompt, image tokens of the inputs and outputs. Image tokens here are DiT tokens,
one per latent patch (16 x 16 pixels in every supported family), so the counts say how much work
a request was, not what OpenAI would bill."""

from __future__ import annotations

import math

from PIL import Image

from configs.families import FamilyConfig


def image_tokens(family: FamilyConfig, width: int, height: int) -> int:
    """Latent patches of a width x height image."""
    return (width // family.latent_patch_pixels) * (height // family.latent_patch_pixels)


def input_image_tokens(family: FamilyConfig, images: list[Image.Image]) -> int:
    """Latent patches of the input images as the pipeline feeds them to the DiT: resized to about
    `edit_condition_area` pixels (Qwen-Image-Edit, as diffusers' calculate_dimensions does), else
    at their size (image-to-image and inpainting inputs already have the output's size here)."""
    total = 0
    for image in images:
        width, height = image.size
        if family.edit_condition_area is not None:
            ratio = width / height
            width = round(math.sqrt(family.edit_condition_area * ratio) / 32) * 32
            height = round(math.sqrt(family.edit_condition_area * ratio) / ratio / 32) * 32
        total += image_tokens(family, width, height)
    return total
