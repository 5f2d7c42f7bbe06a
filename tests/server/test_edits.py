"""POST /v1/images/edits through the official openai SDK (multipart) against the tiny edit models."""

from __future__ import annotations

import base64
import io

import httpx
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
    # the DiT reads the input as diffusers' Qwen-Image-Edit resizes it: about 1024 x 1024, in 16 x 16 patches
    assert result.usage.input_tokens_details.image_tokens == (1024 // 16) ** 2
    assert result.usage.output_tokens == (64 // 16) ** 2


def test_chat_message_with_an_image_edits_it_as_the_edits_route_does(edit_server: ServerProcess):
    """vLLM-Omni's chat shapes for edits: an image_url part with a data: URL, or its short {"image": b64}."""
    _, data, _ = png_file("input.png", (200, 30, 30))
    b64 = base64.b64encode(data).decode()
    fields = {"height": 64, "width": 64, "seed": 3}
    expected = decode(edit_server.client().images.edit(image=("in.png", data, "image/png"), prompt="make it blue",
                                                       size="64x64", extra_body={"seed": 3}).data[0].b64_json)
    for image_part in ({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}, {"image": b64}):
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "make it blue"}, image_part]}],
                "extra_body": fields}
        response = httpx.post(f"{edit_server.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        [part] = response.json()["choices"][0]["message"]["content"]
        edited = decode(part["image_url"]["url"].removeprefix("data:image/png;base64,"))
        assert edited.size == (64, 64) and edited.tobytes() == expected.tobytes()
        assert response.json()["usage"]["prompt_tokens"] > (1024 // 16) ** 2  # the input image's DiT tokens
    without_image = httpx.post(f"{edit_server.url}/v1/chat/completions", timeout=60,
                               json={"messages": [{"role": "user", "content": "make it blue"}]})
    assert without_image.status_code == 400 and "image_url" in without_image.json()["error"]["message"]


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


def test_a_text_to_image_model_edits_image_to_image_at_the_input_size(z_image_server: ServerProcess):
    result = z_image_server.client().images.edit(
        image=png_file("in.png", (200, 30, 30), size=(100, 70)), prompt="make it blue",
        extra_body={"seed": 3, "strength": 0.5, "num_inference_steps": 4})
    assert decode(result.data[0].b64_json).size == (96, 64)  # the input's size, rounded to multiples of 16


def test_inpainting_reads_openai_alpha_masks_and_black_and_white_masks_alike(z_image_server: ServerProcess):
    """The transparent right half of an RGBA mask and the white right half of an L mask mean the same."""
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (32, 0, 64, 64))
    black_and_white = Image.new("L", (64, 64), 0)
    black_and_white.paste(255, (32, 0, 64, 64))
    images = []
    for mask in (alpha, black_and_white):
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        result = z_image_server.client().images.edit(
            image=png_file("in.png", (200, 30, 30), size=(64, 64)), mask=("mask.png", buffer.getvalue(), "image/png"),
            prompt="a window", extra_body={"seed": 9, "num_inference_steps": 2})
        images.append(decode(result.data[0].b64_json))
    assert images[0].size == (64, 64)
    assert images[0].tobytes() == images[1].tobytes()
