"""Clients written for other servers work unchanged: an OpenAI client's model name, `usage` parsed
by the SDK's own types, Server-Timing, SGLang's /v1/model_info, and vLLM-Omni's chat route."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import openai
import pytest
import transformers
from openai.types.images_response import Usage

from tests.helpers import ServerProcess, decode_b64

STEPS = {"num_inference_steps": 2, "seed": 5}
PROMPT = "a small yellow triangle at the top left on a purple background"
# RFC 8941-ish Server-Timing: metric *( ";" param ), params name=token or name="quoted"
_METRIC = re.compile(r'^([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)((?:;\s*[a-z]+=(?:[0-9.]+|"[^"]*"))*)$')


def server_timing(header: str) -> dict[str, float]:
    """{metric: dur in ms}, asserting the header's syntax."""
    parsed = {}
    for metric in header.split(", "):
        match = _METRIC.match(metric.strip())
        assert match, metric
        params = dict(param.split("=", 1) for param in match.group(2).strip(";").split(";"))
        parsed[match.group(1)] = float(params["dur"])
    return parsed


def assert_phases_fit(timings: dict[str, float]) -> None:
    parts = ("queue", "server_pre_denoise", "server_denoise", "server_post_denoise")
    assert all(timings[name] >= 0 for name in parts), timings
    assert sum(timings[name] for name in parts) <= timings["server_gen"] + timings["queue"] <= timings["server_e2e"]


@pytest.fixture(scope="module")
def tokenizer(z_image_server: ServerProcess):
    """The served model's own tokenizer, where GET /v1/model_info says it is."""
    info = httpx.get(f"{z_image_server.url}/v1/model_info").json()
    assert info["model"] == "tiny/z-image" and info["model_type"] == "z-image" and info["is_generation"]
    return transformers.AutoTokenizer.from_pretrained(info["tokenizer_path"])


def test_model_info_names_a_local_folder_that_model_accepts(z_image_server: ServerProcess):
    """SGLang's benchmark client sends /v1/model_info's model_path as `model` (and, for a folder,
    never asks the hub what the model is)."""
    folder = httpx.get(f"{z_image_server.url}/v1/model_info").json()["model_path"]
    assert (Path(folder) / "model_index.json").is_file()
    result = z_image_server.client().images.generate(model=folder, prompt=PROMPT, size="64x64", extra_body=STEPS)
    assert decode_b64(result.data[0].b64_json).size == (64, 64)


def text_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, add_special_tokens=False).input_ids)


def test_an_openai_model_name_generates_with_usage_and_server_timing(z_image_server: ServerProcess, tokenizer):
    raw = z_image_server.client().images.with_raw_response.generate(
        model="gpt-image-1", prompt=PROMPT, n=2, size="64x96", quality="high", background="opaque",
        output_format="webp", extra_body=STEPS)
    result = raw.parse()
    assert [decode_b64(item.b64_json).size for item in result.data] == [(64, 96)] * 2
    assert (result.size, result.quality, result.output_format, result.background) == ("64x96", "high", "webp",
                                                                                       "opaque")
    assert isinstance(result.usage, Usage)
    assert result.usage.input_tokens_details.text_tokens == text_tokens(tokenizer, PROMPT) > 0
    assert result.usage.input_tokens_details.image_tokens == 0
    assert result.usage.output_tokens == 2 * (64 // 16) * (96 // 16)
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    assert result.usage.model_extra["peak_memory_mb"] > 0 and result.model_extra["peak_memory_mb"] > 0
    assert_phases_fit(server_timing(raw.headers["server-timing"]))


def test_an_openai_model_name_edits_and_streams(z_image_server: ServerProcess, tokenizer):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    edited = z_image_server.client().images.edit(model="gpt-image-1", image=("in.png", buffer.getvalue(), "image/png"),
                                                 prompt="make it blue", extra_body=STEPS)
    assert decode_b64(edited.data[0].b64_json).size == (64, 64)
    assert edited.usage.input_tokens_details.image_tokens == (64 // 16) ** 2 == edited.usage.output_tokens
    events = list(z_image_server.client().images.generate(model="gpt-image-1", prompt=PROMPT, size="64x64", n=2,
                                                          stream=True, extra_body=STEPS))
    completed = [event for event in events if event.type == "image_generation.completed"]
    assert len(completed) == 2
    for event in completed:
        assert event.usage.input_tokens_details.text_tokens == text_tokens(tokenizer, PROMPT)
        assert event.usage.output_tokens == 2 * (64 // 16) ** 2  # the prompt's two images
        assert_phases_fit(event.model_extra["server_timing"])


def test_models_list_the_aliases_and_what_the_playground_needs(z_image_server: ServerProcess):
    base = z_image_server.client().models.list().data[0]
    assert base.id == "tiny/z-image" and base.model_extra["aliases"] == ["gpt-image-1"]
    extra = base.model_extra
    assert (extra["family"], extra["default_size"], extra["default_steps"]) == ("z-image", "128x128", 9)
    assert extra["trained_pixels"] == {"min": 128 * 128 // 4, "max": 128 * 128 * 4}
    with pytest.raises(openai.NotFoundError, match="gpt-image-1"):
        z_image_server.client().images.generate(model="dall-e-3", prompt=PROMPT, size="64x64")


def chat_images(completion: dict) -> list:
    """The images of a chat completion: data: URLs in image_url parts."""
    parts = completion["choices"][0]["message"]["content"]
    assert all(part["type"] == "image_url" for part in parts)
    return [decode_b64(part["image_url"]["url"].removeprefix("data:image/png;base64,")) for part in parts]


def test_chat_completions_through_the_sdk_match_the_images_route(z_image_server: ServerProcess, tokenizer):
    """The SDK's extra_body puts vLLM-Omni's generation fields at the top level of the body."""
    client = z_image_server.client()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-image-1", messages=[{"role": "user", "content": PROMPT}], temperature=0.7,
        extra_body={"height": 96, "width": 64, "num_outputs_per_prompt": 2, **STEPS})
    completion = raw.parse()
    images = chat_images(raw.http_response.json())
    assert completion.object == "chat.completion" and completion.choices[0].finish_reason == "stop"
    assert completion.model == "tiny/z-image"
    assert [image.size for image in images] == [(64, 96)] * 2
    assert completion.usage.prompt_tokens == text_tokens(tokenizer, PROMPT)
    assert completion.usage.completion_tokens == 2 * (64 // 16) * (96 // 16)
    assert completion.model_extra["peak_memory_mb"] > 0
    assert_phases_fit(server_timing(raw.headers["server-timing"]))
    same = client.images.generate(model="gpt-image-1", prompt=PROMPT, size="64x96", n=2, extra_body=STEPS)
    assert [image.tobytes() for image in images] == [decode_b64(item.b64_json).tobytes() for item in same.data]


def test_chat_completions_in_the_shapes_of_vllm_omni_docs(z_image_server: ServerProcess):
    """No model (or the benchmark client's "default"), generation fields nested under "extra_body",
    text as a string or as parts."""
    fields = {"height": 64, "width": 64, "num_inference_steps": 2, "true_cfg_scale": 4.0, "seed": 42}
    bodies = [
        {"messages": [{"role": "user", "content": PROMPT}], "extra_body": fields},
        {"model": "default", "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
         "extra_body": fields},
    ]
    pictures = []
    for body in bodies:
        response = httpx.post(f"{z_image_server.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["peak_memory_mb"] > 0 and response.json()["id"].startswith("chatcmpl-")
        [image] = chat_images(response.json())
        assert image.size == (64, 64)
        pictures.append(image.tobytes())
    assert pictures[0] == pictures[1]


@pytest.mark.parametrize(("change", "param", "says"), [
    ({"stream": True}, "stream", "/v1/images/generations"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "text model"),
    ({"modalities": ["text"]}, "modalities", "images only"),
    ({"response_format": {"type": "json_object"}}, "response_format", "text model"),
    ({"seed": 1, "extra_body": {"seed": 2}}, "seed", "twice"),
    ({"extra_body": {"num_frames": 8}}, "num_frames", "unknown parameter"),
    ({"height": 64}, "width", "both"),
    ({"messages": [{"role": "system", "content": "be brief"}]}, "messages", "no text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                                 {"type": "text", "text": "a cat"}]}]}, "messages", "data: URL"),
    ({"model": "dall-e-3"}, "model", "not served"),
])
def test_chat_completions_refuse_what_needs_a_text_model_or_is_wrong(z_image_server, change, param, says):
    body = {"messages": [{"role": "user", "content": PROMPT}], "num_inference_steps": 1, **change}
    response = httpx.post(f"{z_image_server.url}/v1/chat/completions", json=body, timeout=60)
    error = response.json()["error"]
    assert response.status_code in (400, 404) and error["param"] == param and says in error["message"], error
