"""An inpainting mask as the pipelines take it ("L", white = change), from what clients send.

OpenAI's semantics: a PNG with an alpha channel whose fully transparent pixels mark the region to
change. A mask without alpha is read as a plain black-and-white image (white = change).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.errors import InvalidRequestError


def inpainting_mask(mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    if mask.size != image_size:
        raise InvalidRequestError(
            f"mask is {mask.width}x{mask.height} but the image is {image_size[0]}x{image_size[1]}: "
            "they must be the same size", "mask")
    if "A" in mask.getbands() or (mask.mode == "P" and "transparency" in mask.info):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")
    gray = np.asarray(mask.convert("L"))
    if not np.isin(gray, (0, 255)).all():
        raise InvalidRequestError(
            "mask has no alpha channel and is not black and white: send a PNG whose fully transparent pixels "
            "mark the region to change, or a black-and-white image (white = change)", "mask")
    return Image.fromarray(gray, mode="L")
