"""Clients written for other servers work unchanged: an OpenAI client's model name, `usage` parsed
by the SDK's own types, Server-Timing, SGLang's /v1/model_info, and vLLM-Omni's chat route."""

from __future__ import annotations

import io
import re

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
    assert info["model_path"] == "tiny/z-image" and info["model_type"] == "z-image" and info["is_generation"]
    return transformers.AutoTokenizer.from_pretrained(info["tokenizer_path"])


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
