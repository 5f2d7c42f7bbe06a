"""stream=true through the unmodified OpenAI SDK: partial previews, then the completed images."""

from __future__ import annotations

import base64
import io
import json
import os
import signal

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.helpers import ServerProcess, b64_pixels, wait_until

STEPS = {"num_inference_steps": 6, "seed": 11}


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_sdk_iterates_partials_then_completed_images_equal_to_the_unstreamed_ones(z_image_server):
    events = list(client(z_image_server).images.generate(
        model="tiny/z-image", prompt="a red cube", size="96x64", n=2, stream=True, partial_images=2,
        extra_body=STEPS))
    kinds = [(e.type, e.model_extra["image_index"], getattr(e, "partial_image_index", None)) for e in events]
    assert kinds == [("image_generation.partial_image", i, p) for p in (0, 1) for i in (0, 1)] + [
        ("image_generation.completed", i, None) for i in (0, 1)]
    for event in events:
        assert decoded(event.b64_json).size == (96, 64) and event.size == "96x64"
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert completed[0].usage.output_tokens == 2 * (96 // 16) * (64 // 16) and completed[0].usage.input_tokens > 0
    plain = client(z_image_server).images.generate(model="tiny/z-image", prompt="a red cube", size="96x64", n=2,
                                                   extra_body=STEPS)
    for streamed, unstreamed in zip(completed, plain.data):
        assert np.array_equal(b64_pixels(streamed.b64_json), b64_pixels(unstreamed.b64_json))
    first_preview = b64_pixels(events[0].b64_json)
    assert not np.array_equal(first_preview, b64_pixels(completed[0].b64_json))  # an estimate, not the result


def test_partial_images_zero_sends_only_the_completed_event(z_image_server):
    events = list(client(z_image_server).images.generate(
        model="tiny/z-image", prompt="a cat", size="64x64", stream=True, partial_images=0, extra_body=STEPS))
    assert [e.type for e in events] == ["image_generation.completed"]


@pytest.mark.parametrize("value", [4, -1, "x"])
def test_bad_partial_images_is_a_400_in_the_error_envelope(z_image_server, value):
    response = httpx.post(f"{z_image_server.url}/v1/images/generations", timeout=60,
                          json={"prompt": "a cat", "stream": True, "partial_images": value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "partial_images" and error["type"] == "invalid_request_error"


def test_a_client_that_leaves_mid_stream_frees_the_worker(z_image_server):
    cancelled_before = z_image_server.metric("ditserve_requests_cancelled_total")
    body = {"prompt": "a cat", "size": "512x512", "num_inference_steps": 200, "stream": True, "partial_images": 3}
    with httpx.stream("POST", f"{z_image_server.url}/v1/images/generations", json=body, timeout=300) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == "event: image_generation.partial_image"
        assert json.loads(next(lines).removeprefix("data: "))["partial_image_index"] == 0
    wait_until(lambda: z_image_server.metric("ditserve_requests_cancelled_total") == cancelled_before + 1, 60,
               "the abandoned stream cancelled")
    quick = client(z_image_server).images.generate(model="tiny/z-image", prompt="a cat", size="64x64",
                                                   extra_body={"num_inference_steps": 1})
    assert len(quick.data) == 1


def test_an_error_after_the_stream_started_is_an_error_event_the_sdk_raises(z_image_server):
    stream = client(z_image_server).images.generate(
        model="tiny/z-image", prompt="a cat", size="512x512", stream=True, partial_images=3,
        extra_body={"num_inference_steps": 200})
    with pytest.raises(openai.APIError, match="rank") as error:
        for event in stream:
            assert event.type == "image_generation.partial_image"
            os.kill(z_image_server.rank_pids()[0], signal.SIGKILL)  # the driver dies mid-request
    assert error.value.body["code"] == "worker_died"
    wait_until(lambda: httpx.get(f"{z_image_server.url}/health").status_code == 200, 120, "restarted")


def test_edits_stream_image_edit_events(edit_server, tmp_path):
    path = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    with path.open("rb") as image:
        events = list(client(edit_server).images.edit(image=image, prompt="make it blue", size="64x64", stream=True,
                                                      partial_images=1, extra_body={"num_inference_steps": 4}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert all(decoded(e.b64_json).size == (64, 64) for e in events)
