"""The prompt-embedding cache (workers/prompt_cache.py) gives what a fresh encode gives, runs the
text encoders only for calls it has not seen, and keeps to its byte bound."""

from __future__ import annotations

import pytest
import torch

from engine.models.tiny_models import build_tiny_pipeline
from workers.prompt_cache import PromptCache

ENCODES = {  # family -> the encode_prompt arguments its pipeline passes for one prompt
    "z-image": dict(prompt="a red fox", device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry",
                    max_sequence_length=32),
    "qwen-image": dict(prompt="a red fox", device="cpu", num_images_per_prompt=1, max_sequence_length=32),
    "flux": dict(prompt="a red fox", prompt_2=None, device="cpu", num_images_per_prompt=1, max_sequence_length=32),
    "sd3": dict(prompt="a red fox", prompt_2=None, prompt_3=None, device="cpu", num_images_per_prompt=1,
                do_classifier_free_guidance=True, negative_prompt="blurry", max_sequence_length=32),
}


def tensors_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_of(item)]
    return []


def loaded(family: str):
    """A tiny pipeline with its models in eval mode, as from_pretrained gives them (no dropout)."""
    pipeline = build_tiny_pipeline(family)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def counted_encoder_calls(pipeline) -> list[int]:
    calls = [0]
    for name, component in pipeline.components.items():
        if name.startswith("text_encoder") and component is not None:
            component.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("family", ENCODES)
def test_a_repeated_call_is_answered_from_memory_with_the_fresh_encoding(family):
    pipeline = loaded(family)
    fresh = pipeline.encode_prompt(**ENCODES[family])
    cache = PromptCache(max_bytes=2**20)
    cache.install(pipeline, "main")
    calls = counted_encoder_calls(pipeline)
    first = pipeline.encode_prompt(**ENCODES[family])
    encoder_calls = calls[0]
    again = pipeline.encode_prompt(**ENCODES[family])
    assert encoder_calls > 0 and calls[0] == encoder_calls and cache.hits == 1
    for output in (first, again):
        expected, got = tensors_of(fresh), tensors_of(output)
        assert len(got) == len(expected) > 0 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(a is not b for a, b in zip(tensors_of(first), tensors_of(again)))  # each caller gets its own
    pipeline.encode_prompt(**{**ENCODES[family], "max_sequence_length": 16})  # another call: encoded
    assert calls[0] == 2 * encoder_calls and cache.hits == 1
    cache.begin(adapters=(("style", 1.0),))  # a batch with other adapters: encoded
    pipeline.encode_prompt(**ENCODES[family])
    assert calls[0] == 3 * encoder_calls and cache.hits == 0


def test_least_recently_used_entries_leave_first_within_the_byte_bound():
    pipeline = loaded("qwen-image")
    one_entry = sum(t.nbytes for t in tensors_of(pipeline.encode_prompt(**ENCODES["qwen-image"])))
    cache = PromptCache(max_bytes=2 * one_entry)
    cache.install(pipeline, "main")
    calls = counted_encoder_calls(pipeline)
    for prompt in ("a red fox", "a blue bird", "a red fox", "a green frog"):  # the fox was used last: the bird goes
        pipeline.encode_prompt(**{**ENCODES["qwen-image"], "prompt": prompt})
    assert cache.bytes_held <= 2 * one_entry and cache.hits == 1
    pipeline.encode_prompt(**{**ENCODES["qwen-image"], "prompt": "a red fox"})
    assert cache.hits == 2 and calls[0] == 3
    pipeline.encode_prompt(**{**ENCODES["qwen-image"], "prompt": "a blue bird"})
    assert cache.hits == 2 and calls[0] == 4
    passed_in = pipeline.encode_prompt(prompt=None, prompt_embeds=torch.ones(1, 3, 8),
                                       prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long))
    assert torch.equal(passed_in[0], torch.ones(1, 3, 8)) and cache.hits == 2
