"""POST /v1/images/generations through the official openai SDK against a real server."""

from __future__ import annotations

import io

import httpx
from PIL import Image

from tests.helpers import ServerProcess
from tests.helpers import decode_b64 as decode


def test_health_reports_loading_then_ready(z_image_server: ServerProcess):
    assert 503 in z_image_server.health_seen and z_image_server.health_seen[-1] == 200
    assert "ditserve ready: serving tiny/z-image at http://127.0.0.1:" in z_image_server.log()


def test_generate_two_pngs_of_the_asked_size(z_image_server: ServerProcess):
    result = z_image_server.client().images.generate(
        model="tiny/z-image", prompt="a cat reading a book", n=2, size="64x64", response_format="b64_json",
        extra_body={"num_inference_steps": 2},
    )
    images = [decode(item.b64_json) for item in result.data]
    assert len(images) == 2
    assert all(image.format == "PNG" and image.size == (64, 64) for image in images)
    assert images[0].tobytes() != images[1].tobytes()
    assert result.size == "64x64" and result.output_format == "png"


def test_same_seed_gives_identical_bytes_and_the_seed_is_reported(z_image_server: ServerProcess):
    client = z_image_server.client()
    first = client.images.generate(prompt="a lighthouse", size="64x96", extra_body={"num_inference_steps": 2})
    seed = first.model_extra["seed"]
    again = client.images.generate(
        prompt="a lighthouse", size="64x96", extra_body={"num_inference_steps": 2, "seed": seed})
    assert again.data[0].b64_json == first.data[0].b64_json
    assert decode(first.data[0].b64_json).size == (64, 96)
    assert again.data[0].model_extra["seed"] == seed


def test_url_response_downloads(z_image_server: ServerProcess):
    result = z_image_server.client().images.generate(
        prompt="a boat", size="64x64", response_format="url", extra_body={"num_inference_steps": 1})
    url = result.data[0].url
    assert url.startswith(z_image_server.url + "/files/images/")
    download = httpx.get(url)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (64, 64)
    assert httpx.get(url[:-4] + "xxxx").status_code == 404


def test_jpeg_and_webp_outputs(z_image_server: ServerProcess):
    client = z_image_server.client()
    for output_format, pil_format in (("jpeg", "JPEG"), ("webp", "WEBP")):
        result = client.images.generate(prompt="a tree", size="64x64", output_format=output_format,
                                        output_compression=80, extra_body={"num_inference_steps": 1})
        assert decode(result.data[0].b64_json).format == pil_format


def test_auto_size_is_the_model_default(z_image_server: ServerProcess):
    result = z_image_server.client().images.generate(
        prompt="a hill", size="auto", extra_body={"num_inference_steps": 1})
    assert decode(result.data[0].b64_json).size == (128, 128)


def test_models_version_and_request_ids(z_image_server: ServerProcess):
    models = z_image_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny/z-image"]
    version = httpx.get(f"{z_image_server.url}/version")
    assert version.json()["version"] == "0.1.0"
    ids = {httpx.get(f"{z_image_server.url}/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


def test_openapi_documents_both_image_endpoints(z_image_server: ServerProcess):
    spec = httpx.get(f"{z_image_server.url}/openapi.json").json()

    def schema(reference_or_schema: dict) -> dict:
        name = reference_or_schema.get("$ref", "").rpartition("/")[2]
        return spec["components"]["schemas"][name] if name else reference_or_schema

    def request_schema(path: str, content_type: str) -> dict:
        return schema(spec["paths"][path]["post"]["requestBody"]["content"][content_type]["schema"])

    endpoints = (("/v1/images/generations", "application/json"), ("/v1/images/edits", "multipart/form-data"))
    for path, content_type in endpoints:
        operation = spec["paths"][path]["post"]
        request = request_schema(path, content_type)
        assert {"prompt", "n", "size", "seed", "num_inference_steps", "response_format"} <= set(request["properties"])
        assert "prompt" in request["required"]
        response = schema(operation["responses"]["200"]["content"]["application/json"]["schema"])
        assert {"created", "data", "size", "seed", "output_format"} <= set(response["properties"])
        item = schema(response["properties"]["data"]["items"])
        assert {"b64_json", "url", "seed"} <= set(item["properties"])
    edit_form = request_schema(*endpoints[1])
    assert {"image", "mask"} <= set(edit_form["properties"]) and "image" in edit_form["required"]
    generation = request_schema(*endpoints[0])
    steps = generation["properties"]["num_inference_steps"]["anyOf"][0]  # optional: [integer, null]
    assert generation["properties"]["n"]["maximum"] == 10 and steps["maximum"] == 200  # the engine's own limits
