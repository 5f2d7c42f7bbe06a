"""The prompt-embedding cache: a pipeline's `encode_prompt` answered from memory when it was called
with the same arguments before, so a repeated prompt does not run the text encoders again.

It lives on the driver rank only. The text encoders' TP shards run on the other ranks only when
the driver's encoder call is broadcast to them (forward_broadcast), so a hit spares every rank the
encoder and keeps one copy of the embeddings, not one per rank. An entry is keyed by the pipeline,
the batch's adapters (a LoRA may adapt a text encoder) and every argument of the call (prompts,
negative prompts, maximum length, an edit's condition images by content), so only a call that
would give the same tensors is answered from it. Entries are least recently used first out, bounded
by their tensors' bytes; any adapter load or unload empties it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from PIL import Image


class _Uncacheable(Exception):
    """An argument the key cannot hold (embeddings passed in, an unknown type): call through."""


class BytesLru:
    """A map bounded by the bytes of its values, least recently used out first; a value larger than
    the bound is not kept. The prompt cache's and the engine's result cache's store."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes_held = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes_held -= self._entries.pop(key)[1]
        self._entries[key] = (value, size)
        self.bytes_held += size
        while self.bytes_held > self.max_bytes:
            self.bytes_held -= self._entries.popitem(last=False)[1][1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes_held = 0


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = 0  # calls answered from memory since the batch began
        self._adapters: tuple = ()  # the running batch's adapters, part of every key
        self._store = BytesLru(max_bytes)

    @property
    def bytes_held(self) -> int:
        return self._store.bytes_held

    def begin(self, adapters: tuple) -> None:
        """Before each batch: its adapters, and no hits counted yet."""
        self._adapters, self.hits = adapters, 0

    def install(self, pipeline: Any, name: str) -> None:
        """Answer `pipeline.encode_prompt` from the cache (a no-op with max_bytes 0)."""
        encode = getattr(pipeline, "encode_prompt", None)
        if self.max_bytes <= 0 or encode is None:
            return
        signature = inspect.signature(encode)

        @functools.wraps(encode)
        def cached_encode(*args, **kwargs):
            try:
                key = self._key(name, signature, args, kwargs)
            except _Uncacheable:
                return encode(*args, **kwargs)
            return self._lookup(key, lambda: encode(*args, **kwargs))

        pipeline.encode_prompt = cached_encode

    def clear(self) -> None:
        self._store.clear()

    def _key(self, name: str, signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        for argument, value in bound.arguments.items():
            if "embeds" in argument and value is not None:
                raise _Uncacheable(argument)
        return name, self._adapters, tuple((argument, _hashable(value)) for argument, value in bound.arguments.items())

    def _lookup(self, key: tuple, encode) -> Any:
        cached = self._store.get(key)
        if cached is not None:
            self.hits += 1
            return _copied(cached)
        output = encode()
        self._store.put(key, _copied(output), _tensor_bytes(output))
        return output


def _hashable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, Image.Image):
        return image_digest(value)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return ("tensor", str(data.dtype), tuple(data.shape),
                hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest())
    raise _Uncacheable(type(value).__name__)


def image_digest(image: Image.Image) -> tuple:
    """An image by content: equal pixels, mode and size give equal digests."""
    return "image", image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()


def _copied(value: Any) -> Any:
    """A copy of every tensor in `value`: neither the pipeline nor the cache sees the other's writes."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return value


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0
