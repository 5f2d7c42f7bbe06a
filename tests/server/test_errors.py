"""A battery of bad requests: each gets the right status and OpenAI's error envelope, none hurts the server."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import httpx
import pytest
from PIL import Image

from tests.helpers import ServerProcess

UPLOAD_LIMIT = 2**20  # the edit server runs with --max-upload-bytes 1 MiB


def image_bytes(size=(32, 32), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class Bad:
    name: str
    status: int
    param: str | None
    server: str = "z_image"  # or "edit"
    method: str = "POST"
    path: str = "/v1/images/generations"
    json: object = None
    content: bytes | None = None
    headers: dict = field(default_factory=dict)
    files: list | None = None
    data: dict | None = None
    code: str | None = None

    def send(self, base_url: str) -> httpx.Response:
        kwargs = {"headers": self.headers}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.content is not None:
            kwargs["content"] = self.content
        if self.files is not None:
            kwargs["files"] = self.files
            kwargs["data"] = self.data or {}
        return httpx.request(self.method, base_url + self.path, timeout=60, **kwargs)


def edit(name, status, param, files=None, data=None, server="edit", code=None) -> Bad:
    files = files if files is not None else [("image", ("in.png", image_bytes(), "image/png"))]
    return Bad(name, status, param, server=server, path="/v1/images/edits", files=files,
               data={"prompt": "make it red", **(data or {})}, code=code)


JSON = {"content-type": "application/json"}
CASES = [
    Bad("malformed json", 400, None, content=b'{"prompt": "a cat",', headers=JSON, code="invalid_json"),
    Bad("json array body", 400, None, content=b'["a cat"]', headers=JSON, code="invalid_json"),
    Bad("missing prompt", 400, "prompt", json={"n": 1}, code="missing_required_parameter"),
    Bad("empty prompt", 400, "prompt", json={"prompt": ""}),
    Bad("prompt too long", 400, "prompt", json={"prompt": "a" * 32001}),
    Bad("n zero", 400, "n", json={"prompt": "a cat", "n": 0}),
    Bad("n eleven", 400, "n", json={"prompt": "a cat", "n": 11}),
    Bad("n not a number", 400, "n", json={"prompt": "a cat", "n": "two"}),
    Bad("size not WxH", 400, "size", json={"prompt": "a cat", "size": "big"}),
    Bad("size not a multiple of 16", 400, "size", json={"prompt": "a cat", "size": "72x64"}),
    Bad("size too large", 400, "size", json={"prompt": "a cat", "size": "4096x4096"}),
    Bad("size too small", 400, "size", json={"prompt": "a cat", "size": "16x16"}),
    Bad("unknown model", 404, "model", json={"prompt": "a cat", "model": "dall-e-3"}, code="model_not_found"),
    Bad("wrong content type", 415, None, content=b"prompt=a cat", headers={"content-type": "text/plain"}),
    Bad("unknown parameter", 400, "colour", json={"prompt": "a cat", "colour": "red"}, code="unknown_parameter"),
    Bad("stream with url", 400, "stream", json={"prompt": "a cat", "stream": True, "response_format": "url"}),
    Bad("transparent background", 400, "background", json={"prompt": "a cat", "background": "transparent"}),
    Bad("bad response_format", 400, "response_format", json={"prompt": "a cat", "response_format": "jpeg"}),
    Bad("bad output_format", 400, "output_format", json={"prompt": "a cat", "output_format": "gif"}),
    Bad("compression above 100", 400, "output_compression", json={"prompt": "a cat", "output_compression": 101}),
    Bad("negative seed", 400, "seed", json={"prompt": "a cat", "seed": -1}),
    Bad("zero steps", 400, "num_inference_steps", json={"prompt": "a cat", "num_inference_steps": 0}),
    Bad("negative guidance", 400, "guidance_scale", json={"prompt": "a cat", "guidance_scale": -1}),
    Bad("unknown route", 404, None, method="GET", path="/v1/images/variations/nope", code="not_found"),
    Bad("wrong method", 405, None, method="GET", code="method_not_allowed"),
    Bad("generation on an edit model", 400, "model", server="edit", json={"prompt": "a cat"},
        code="unsupported_endpoint"),
    edit("mask of another size", 400, "mask", server="z_image", files=[
        ("image", ("in.png", image_bytes(size=(64, 64)), "image/png")),
        ("mask", ("m.png", image_bytes(size=(32, 32)), "image/png"))]),
    edit("two images and a mask", 400, "mask", server="z_image", files=[
        ("image[]", ("a.png", image_bytes(), "image/png")), ("image[]", ("b.png", image_bytes(), "image/png")),
        ("mask", ("m.png", image_bytes(), "image/png"))]),
    edit("edit without image", 400, "image", files=[("mask", ("m.png", image_bytes(), "image/png"))]),
    edit("edit with a text file as image", 400, "image", files=[("image", ("a.png", b"not an image", "image/png"))],
         code="invalid_image"),
    edit("edit with an empty file", 400, "image", files=[("image", ("a.png", b"", "image/png"))]),
    edit("edit with a gif", 400, "image", files=[("image", ("a.gif", image_bytes(fmt="GIF"), "image/gif"))],
         code="invalid_image_format"),
    edit("edit with an oversize upload", 413, "image",
         files=[("image", ("big.png", image_bytes() + b"\0" * UPLOAD_LIMIT, "image/png"))], code="file_too_large"),
    edit("edit with a decompression bomb", 400, "image",
         files=[("image", ("bomb.png", image_bytes(size=(5000, 5000)), "image/png"))], code="image_too_large"),
    edit("mask neither transparent nor black and white", 400, "mask", files=[
        ("image", ("in.png", image_bytes(size=(64, 64)), "image/png")),
        ("mask", ("m.png", image_bytes(size=(64, 64)), "image/png"))]),
    edit("image too small to inpaint", 400, "image", files=[
        ("image", ("in.png", image_bytes(), "image/png")), ("mask", ("m.png", image_bytes(), "image/png"))]),
    edit("edit with n zero", 400, "n", data={"n": "0"}),
    edit("edit with fewer steps than the scheduler handles", 400, "num_inference_steps",
         data={"num_inference_steps": "1"}),
    edit("edit with a bad size", 400, "size", data={"size": "100x100"}),
    Bad("edit sent as json", 415, None, server="edit", path="/v1/images/edits", json={"prompt": "a cat"}),
]


@pytest.fixture(scope="module")
def servers(z_image_server: ServerProcess, edit_server: ServerProcess) -> dict[str, ServerProcess]:
    return {"z_image": z_image_server, "edit": edit_server}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_gets_openai_error(case: Bad, servers):
    response = case.send(servers[case.server].url)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == case.param, body
    assert body["error"]["message"] and isinstance(body["error"]["type"], str)
    if case.code is not None:
        assert body["error"]["code"] == case.code, body
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-request-id"]


def test_server_is_healthy_and_serves_after_the_battery(servers):
    for case in CASES:  # the whole battery once more, then a good request on each server
        case.send(servers[case.server].url)
    for server in servers.values():
        assert httpx.get(f"{server.url}/health").status_code == 200
    good = httpx.post(f"{servers['z_image'].url}/v1/images/generations",
                      json={"prompt": "a cat", "size": "64x64", "num_inference_steps": 1}, timeout=60)
    assert good.status_code == 200 and len(good.json()["data"]) == 1


def test_sdk_raises_typed_errors_with_param(z_image_server: ServerProcess):
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        z_image_server.client().images.generate(prompt="a cat", size="72x64")
    assert bad.value.param == "size" and "16" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        z_image_server.client().images.generate(prompt="a cat", model="dall-e-3")
    assert missing.value.code == "model_not_found"

