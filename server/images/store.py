"""Generated images kept for `response_format=url`: unguessable ids, limited lifetime and count."""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")  # secrets.token_urlsafe(24)


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


class DirectoryImageStore:
    """The same store in a directory every server can read (`--image-store-dir`): replicas behind
    one endpoint (Ray Serve) or a load balancer answer each other's urls. A shared mount (NFS, a
    bucket's FUSE mount) spans machines. The file's age is its age; the oldest go beyond max_images."""

    _SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpeg", "image/webp": ".webp"}

    def __init__(self, directory: Path, ttl_s: float = 3600.0, max_images: int = 1000):
        self.directory, self.ttl_s, self.max_images = Path(directory), ttl_s, max_images
        self.directory.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, media_type: str) -> str:
        token = secrets.token_urlsafe(24)
        partial = self.directory / f".{token}.partial"
        partial.write_bytes(data)
        partial.rename(self.directory / f"{token}{self._SUFFIXES[media_type]}")  # readers never see half a file
        self._evict()
        return token

    def get(self, token: str) -> tuple[bytes, str] | None:
        if not _TOKEN.fullmatch(token):
            return None
        for media_type, suffix in self._SUFFIXES.items():
            path = self.directory / f"{token}{suffix}"
            try:
                if time.time() - path.stat().st_mtime <= self.ttl_s:
                    return path.read_bytes(), media_type
            except FileNotFoundError:
                continue
        return None

    def _evict(self) -> None:
        """Drop expired files and the oldest beyond max_images (another server may be deleting too)."""
        files = []
        for path in self.directory.glob("[!.]*"):
            with contextlib.suppress(FileNotFoundError):
                files.append((path.stat().st_mtime, path))
        now = time.time()
        for index, (modified, path) in enumerate(sorted(files, reverse=True)):
            if index >= self.max_images or now - modified > self.ttl_s:
                path.unlink(missing_ok=True)
