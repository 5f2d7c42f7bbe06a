"""LoRA adapters over HTTP with vLLM's conventions: `model` names an adapter (plus `lora_scale`),
`loras` composes several, /v1/models lists them with their parent, and with --enable-lora-loading
POST /v1/load_lora_adapter and /v1/unload_lora_adapter change them while the server serves."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import (
    REFERENCE_PROMPT,
    REFERENCE_SEED,
    REFERENCE_STEPS,
    ServerProcess,
    decode_b64,
    max_pixel_difference,
    reference_image,
    served,
)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    return tmp_path_factory.mktemp("uploaded-adapters")


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, adapters, uploads):
    paths = adapters("z-image")
    yield from served(tmp_path_factory, "lora", "tiny/z-image", "--tensor-parallel-size", "2",
                      "--lora-modules", f"a={paths['a']}", f"b={paths['b']}", "--enable-lora-loading",
                      "--allowed-lora-paths", str(paths["a"].parent), str(uploads))


def _generate(server: ServerProcess, model: str, **extra):
    response = server.client().images.generate(
        model=model, prompt=REFERENCE_PROMPT, size="96x64",
        extra_body={"seed": REFERENCE_SEED, "num_inference_steps": REFERENCE_STEPS, **extra})
    return decode_b64(response.data[0].b64_json)


def test_models_lists_each_adapter_with_its_parent(lora_server, adapters):
    data = httpx.get(f"{lora_server.url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("tiny/z-image", None), ("a", "tiny/z-image"),
                                                       ("b", "tiny/z-image")]
    assert data[1]["root"] == str(adapters("z-image")["a"])


def test_model_names_an_adapter_and_loras_compose(lora_server, tiny_dir, adapters):
    paths = adapters("z-image")
    expected = reference_image(tiny_dir("z-image"), "z-image", 64, 96, loras=((paths["a"], 0.7),))
    assert max_pixel_difference(_generate(lora_server, "a", lora_scale=0.7), expected) <= 1
    composed = _generate(lora_server, "tiny/z-image", loras=[{"name": "a"}, {"name": "b", "scale": 1.5}])
    expected = reference_image(tiny_dir("z-image"), "z-image", 64, 96, loras=((paths["a"], 1.0), (paths["b"], 1.5)))
    assert max_pixel_difference(composed, expected) <= 1
    base = reference_image(tiny_dir("z-image"), "z-image", 64, 96)
    assert max_pixel_difference(_generate(lora_server, "tiny/z-image"), base) <= 1


def test_unknown_adapters_and_misplaced_scales_are_refused(lora_server):
    with pytest.raises(openai.NotFoundError) as raised:
        _generate(lora_server, "c")
    error = raised.value.body
    assert error["code"] == "model_not_found" and "'a', 'b'" in error["message"]
    with pytest.raises(openai.NotFoundError) as raised:
        _generate(lora_server, "tiny/z-image", loras=[{"name": "nope"}])
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as raised:
        _generate(lora_server, "tiny/z-image", lora_scale=0.5)
    assert raised.value.body["param"] == "lora_scale"


def test_adapters_load_and_unload_at_runtime(lora_server, adapters, uploads):
    corrupt = uploads / "broken.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    url = lora_server.url
    response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(corrupt)})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_lora_adapter"
    response = httpx.post(f"{url}/v1/load_lora_adapter",
                          json={"lora_name": "tiny/z-image", "lora_path": str(adapters("z-image")["b"])})
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("invalid_lora_name", "lora_name")
    response = httpx.post(f"{url}/v1/load_lora_adapter",
                          json={"lora_name": "c", "lora_path": str(adapters("z-image")["b"])})
    assert response.status_code == 200, response.text
    assert _generate(lora_server, "c", num_inference_steps=2).size == (96, 64)
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _generate(lora_server, "c", num_inference_steps=2)
    response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_runtime_loading_reads_only_under_the_allowed_folders(lora_server, uploads, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"\x00" * 64)
    (uploads / "escape.safetensors").symlink_to(outside)
    answers = []
    for path in (str(outside), str(tmp_path / "missing.safetensors"), str(uploads / "escape.safetensors"),
                 str(uploads / ".." / outside.name), "/etc/passwd", "org/some-hub-adapter"):
        response = httpx.post(f"{lora_server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert response.status_code == 400, path
        answers.append(response.json()["error"])
    # the same answer whether the file exists, does not, or is a link out of an allowed folder
    assert all(a == answers[0] for a in answers) and answers[0]["code"] == "lora_path_not_allowed"
    assert answers[0]["param"] == "lora_path"


def test_runtime_loading_is_off_unless_enabled(z_image_server):
    response = httpx.post(f"{z_image_server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert response.status_code == 404


def test_an_edit_form_sends_loras_as_json_text():
    from server.schemas import ImageEditRequest

    body = ImageEditRequest.model_validate({"prompt": "x", "loras": '[{"name": "a", "scale": 0.5}]'})
    assert [(lora.name, lora.scale) for lora in body.sampling_params("m").loras] == [("m", 1.0), ("a", 0.5)]
