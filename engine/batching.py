"""Which waiting requests may share one pipeline call, and which go next.

A batch starts with the oldest waiting request and takes, in arrival order, every later request
with the same batch key until it holds `max_images` images. The oldest request always runs next,
so no request waits behind others forever, whatever their parameters. A request marked `alone`
(the engine runs each request of a failed batch again by itself) never shares a call.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

from workers import GenerationRequest


class HasRequest(Protocol):
    request: GenerationRequest
    alone: bool


def batch_key(request: GenerationRequest) -> Hashable:
    """Requests with equal keys differ only in prompt, negative prompt and seed."""
    if request.images:  # input images are pipeline-wide: an edit request runs alone
        return ("alone", request.request_id)
    # A pipeline takes negative prompts for all prompts or for none; LoRA adapters apply to a whole call.
    return request.sampling, request.negative_prompt is None, request.loras


def take_batch(waiting: Sequence[HasRequest], max_images: int) -> list[HasRequest]:
    """The next batch: the oldest item plus compatible later ones (the oldest alone may exceed max_images)."""
    head = waiting[0]
    if head.alone:
        return [head]
    key, images = batch_key(head.request), head.request.sampling.num_outputs_per_prompt
    batch = [head]
    for item in waiting[1:]:
        count = item.request.sampling.num_outputs_per_prompt
        if images + count > max_images:
            break
        if not item.alone and batch_key(item.request) == key:
            batch.append(item)
            images += count
    return batch
