"""Image bytes in and out: encoding results, and decoding uploads without trusting them."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from server.errors import APIError, invalid

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
UPLOAD_FORMATS = {"PNG", "JPEG", "WEBP"}
MAX_UPLOAD_PIXELS = 4096 * 4096


def encode(image: Image.Image, output_format: str, compression: int) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=compression)
    return buffer.getvalue()


def decode_upload(data: bytes, param: str, max_bytes: int, keep_mode: bool = False) -> Image.Image:
    """An RGB image from uploaded bytes (in its own mode with `keep_mode`: a mask, which
    engine.intake.masks reads by its alpha or as black and white); 400/413 errors name `param` and say
    what is accepted."""
    if len(data) > max_bytes:
        raise APIError(413, f"{param} is {len(data)} bytes; the limit is {max_bytes} bytes", param, "file_too_large")
    if not data:
        raise invalid(f"{param} is empty", param, "invalid_image")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        raise invalid(f"{param} is not an image: upload PNG, JPEG or WebP", param, "invalid_image") from None
    if image.format not in UPLOAD_FORMATS:
        raise invalid(f"{param} is {image.format}; upload PNG, JPEG or WebP", param, "invalid_image_format")
    width, height = image.size
    if width * height > MAX_UPLOAD_PIXELS:
        raise invalid(
            f"{param} is {width}x{height} pixels; at most {MAX_UPLOAD_PIXELS} pixels are accepted", param,
            "image_too_large",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:
        raise invalid(f"{param} could not be decoded ({type(exc).__name__})", param, "invalid_image") from None
    return image if keep_mode else image.convert("RGB")
