"""POST /v1/images/edits through the official openai SDK (multipart) against the tiny edit models."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.helpers import ServerProcess, served
from tests.helpers import decode_b64 as decode


def png_file(name: str, color: tuple[int, int, int], size=(48, 48)) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return name, buffer.getvalue(), "image/png"


def test_edit_one_image(edit_server: ServerProcess, tmp_path):
    path = tmp_path / "input.png"
    path.write_bytes(png_file("input.png", (200, 30, 30))[1])
    with path.open("rb") as image:
        result = edit_server.client().images.edit(
            image=image, prompt="make it blue", size="64x64", extra_body={"seed": 3})
    assert len(result.data) == 1
    edited = decode(result.data[0].b64_json)
    assert edited.format == "PNG" and edited.size == (64, 64)
    assert result.data[0].model_extra["seed"] == 3


def test_edit_a_list_of_images_sends_image_brackets_and_edits_each(edit_server: ServerProcess):
    images = [png_file("red.png", (200, 30, 30)), png_file("green.png", (30, 200, 30), size=(40, 56))]
    result = edit_server.client().images.edit(
        image=images, prompt="add a hat", size="80x64", extra_body={"seed": 5})
    edited = [decode(item.b64_json) for item in result.data]
    assert len(edited) == 2 and all(image.size == (80, 64) for image in edited)
    assert edited[0].tobytes() != edited[1].tobytes()  # different inputs, same seed: different edits


@pytest.fixture(scope="module")
def plus_server(tmp_path_factory):
    yield from served(tmp_path_factory, "edit-plus", "tiny/qwen-image-edit-plus",
                      "--default-sampling-params", '{"num_inference_steps": 2}')


def test_edit_plus_reads_every_image_as_a_condition_of_one_result(plus_server: ServerProcess):
    images = [png_file("red.png", (200, 30, 30)), png_file("green.png", (30, 200, 30), size=(40, 56))]
    one = plus_server.client().images.edit(image=images, prompt="put them together", size="64x64",
                                           extra_body={"seed": 5})
    assert len(one.data) == 1 and decode(one.data[0].b64_json).size == (64, 64)
    only_red = plus_server.client().images.edit(image=images[:1], prompt="put them together", size="64x64",
                                                extra_body={"seed": 5})
    assert decode(only_red.data[0].b64_json).tobytes() != decode(one.data[0].b64_json).tobytes()
