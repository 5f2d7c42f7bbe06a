"""Generated images kept for `response_format=url`: unguessable ids, limited lifetime and count."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict


class ImageStore:
    def __init__(self, ttl_s: float = 3600.0, max_images: int = 1000):
        self.ttl_s, self.max_images = ttl_s, max_images
        self._images: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._evict(time.monotonic())
            self._images[token] = (time.monotonic() + self.ttl_s, data, media_type)
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
        return token

    def get(self, token: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._evict(time.monotonic())
            entry = self._images.get(token)
        return None if entry is None else (entry[1], entry[2])

    def _evict(self, now: float) -> None:
        while self._images:
            token, (expires, _, _) = next(iter(self._images.items()))
            if expires > now:
                return
            del self._images[token]
