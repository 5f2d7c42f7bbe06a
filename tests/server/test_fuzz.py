"""Fuzzing the image routes of a real `serve` process: any body, valid or not, gets either images of
the asked size or a 4xx in OpenAI's shape, never a 5xx. Hypothesis draws each field from values
the schema admits, values at and past its bounds, and any JSON at all; the run is derandomized
(the same examples every time) and bounded in examples, so it cannot flake or run away."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.schemas import ErrorResponse, ImagesResponse
from tests.helpers import ServerProcess, decode_b64, served

# A request may ask for at most this much work (width x height / 1e6 x steps x n): the valid
# examples stay cheap (a few 64x64 steps), everything larger must be a clean 400.
WORK_CAP = "0.1"
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                    max_size=3), max_leaves=6)
sizes = st.sampled_from(["auto", "64x64", "128x64", "64x128", "13x13", "0x0", "64x", "1024x1024", "4096x4096",
                         "64X64", " 64x64", "-64x64"]) | st.text(max_size=12)
small = st.integers(0, 4)  # mostly values a tiny model serves quickly, then anything around the bounds
numbers = small | small | st.integers(-3, 300) | st.floats(-2, 300, allow_nan=False) | st.sampled_from([0.5, 10**20])
FIELDS = {
    "prompt": st.text(max_size=300) | st.sampled_from(["a cat", " ", "x" * 33000]),
    "model": st.sampled_from(["tiny/z-image", "gpt-image-1", "", "a/../../b"]) | st.text(max_size=10),
    "n": numbers, "size": sizes, "num_inference_steps": numbers, "seed": numbers, "guidance_scale": numbers,
    "true_cfg_scale": numbers, "strength": numbers, "partial_images": numbers, "output_compression": numbers,
    "response_format": st.sampled_from(["b64_json", "url", "bmp"]),
    "output_format": st.sampled_from(["png", "jpeg", "webp", "gif"]),
    "quality": st.sampled_from(["low", "hd", "ultra"]), "background": st.sampled_from(["auto", "transparent"]),
    "stream": st.booleans(), "negative_prompt": st.text(max_size=50), "user": st.text(max_size=20),
    "lora_scale": numbers, "loras": st.lists(st.fixed_dictionaries({"name": st.text(max_size=5)}), max_size=2),
    "max_sequence_length": numbers, "unknown_field": st.integers(),
}
CHEAP = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}
# mostly a servable request with a few fields changed (reaches the engine and the ranks), else anything
near_valid = st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: FIELDS[name] for name in names})).map(lambda body: {**CHEAP, **body})
anything = st.fixed_dictionaries({}, optional={name: values | any_json for name, values in FIELDS.items()})
bodies = st.integers(0, 3).flatmap(lambda branch: anything if branch == 0 else near_valid)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    yield from served(tmp_path_factory, "fuzz", "tiny/z-image", "--max-megapixel-steps", WORK_CAP)


def check(response: httpx.Response, body) -> None:
    assert response.status_code < 500, (body, response.text[:500])
    if response.status_code >= 400:
        error = ErrorResponse.model_validate(response.json()).error
        assert error.code and error.message, error
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        assert "event: error" not in response.text or '"code": "' in response.text
        return
    answer = ImagesResponse.model_validate(response.json())
    size = body.get("size") if isinstance(body, dict) else None
    for item in answer.data:
        if item.b64_json is not None:
            image = decode_b64(item.b64_json)
            assert size in (None, "auto") or f"{image.width}x{image.height}" == size


@FUZZ
@given(body=bodies)
def test_generations_never_5xx(fuzz_server: ServerProcess, body):
    response = httpx.post(f"{fuzz_server.url}/v1/images/generations", content=json.dumps(body), timeout=120,
                          headers={"content-type": "application/json"})
    check(response, body)


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 10)).save(buffer, "PNG")
    return buffer.getvalue()


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.text(max_size=12) | numbers.map(str), max_size=6),
       side=st.sampled_from([16, 64, 100, 3000]), with_mask=st.booleans())
def test_edits_never_5xx(fuzz_server: ServerProcess, fields, side, with_mask):
    files = [("image", ("in.png", _png(side)))] + ([("mask", ("mask.png", _png(side)))] if with_mask else [])
    response = httpx.post(f"{fuzz_server.url}/v1/images/edits", data={"prompt": "a cat", **fields}, files=files,
                          timeout=120)
    check(response, fields)
